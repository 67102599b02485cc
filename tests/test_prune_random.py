"""Property-based prune tests: random nets (CNN, residual, Inception concat, depthwise, grouped +
GroupNorm, SE, split/chunk, ViT-like attention) × random plans × strategies.

For every generated case the pruned module equals its masked reference, its parameter count is the
one the plan implies (union/intersection), and (a smaller sample) it exports to ONNX with parity.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers.pruning import assert_close, expected_params, random_plan
from helpers.random_models import build_random_net, random_net_specs
from helpers.reached import at_least, reached
from hypothesis import given, settings
from hypothesis import strategies as st

from zoocompiler.core.modules import count_params
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.plans import STRATEGIES
from zoocompiler.passes.analysis.shapes import ShapePass
from zoocompiler.passes.analysis.unit_groups import UnitGroupPass
from zoocompiler.passes.rewrite.prune import masked_reference, prune

# Minimum examples per run that must get past the "plan prunes nothing" early return to the equality check
# (helpers.reached): the stem's conv group is always prunable, so every generated net reaches it (300 of 300
# sampled); at least 80 % of max_examples leaves room for hypothesis dropping duplicate inputs, and a
# generator that stopped reaching the check (count 0) fails.


def _case(spec, seed: int, strategy: str):
    kwargs, shape = spec
    net = build_random_net(kwargs, seed=seed)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    gm = trace(net, x, analyze=False)
    ShapePass()(gm)  # prune needs shapes and unit groups only
    UnitGroupPass()(gm)
    return gm, x, random_plan(gm, seed=seed, strategy=strategy)


def _check_equal(gm, x, plan):
    result = prune(gm, plan, strategy_macs=False)
    with torch.no_grad():
        scale = gm(x).abs().max().item()
        assert_close(result.module(x), masked_reference(gm, plan)(x), scale)
    assert result.report.params_after <= result.report.params_before
    return result, scale


STRATEGY = st.sampled_from(["union", "intersection"])


@at_least(40)
@settings(max_examples=50, deadline=None)
@given(spec=random_net_specs(max_blocks=4), seed=st.integers(0, 10_000), strategy=STRATEGY)
def test_random_prune_equals_masked_reference(spec, seed, strategy):
    _prune_case(spec, seed, strategy)


@pytest.mark.slow
@at_least(160)
@settings(max_examples=200, deadline=None)
@given(spec=random_net_specs(max_blocks=6), seed=st.integers(0, 10_000), strategy=st.sampled_from(STRATEGIES))
def test_random_prune_many(spec, seed, strategy):
    if strategy == "pad":
        _pad_case(spec, seed)
    else:
        _prune_case(spec, seed, strategy)


def _prune_case(spec, seed, strategy):
    gm, x, plan = _case(spec, seed, strategy)
    if not plan.keep:
        return
    result, _ = _check_equal(gm, x, plan)
    assert count_params(result.module) == expected_params(gm, plan)
    reached()


@at_least(40)
@settings(max_examples=50, deadline=None)
@given(spec=random_net_specs(max_blocks=4), seed=st.integers(0, 10_000))
def test_random_pad_equals_masked_reference(spec, seed):
    _pad_case(spec, seed)


def _pad_case(spec, seed):
    gm, x, plan = _case(spec, seed, "pad")
    if not plan.keep:
        return
    result, _ = _check_equal(gm, x, plan)
    if plan.producer_keep:
        union = prune(gm, plan.with_strategy("union"), strategy_macs=False)
        assert result.report.macs_after <= union.report.macs_after
    reached()


@at_least(9)
@settings(max_examples=12, deadline=None)
@given(spec=random_net_specs(max_blocks=3), seed=st.integers(0, 10_000), strategy=st.sampled_from(["union", "pad"]))
def test_random_pruned_exports_to_onnx(spec, seed, strategy, tmp_path_factory):
    gm, x, plan = _case(spec, seed, strategy)
    if not plan.keep:
        return
    result, scale = _check_equal(gm, x, plan)
    path = tmp_path_factory.mktemp("onnx") / f"pruned_{random.getrandbits(32)}.onnx"
    report = export_onnx(result.module, x, path)
    assert report.max_abs_diff <= 1e-4 * max(1.0, scale)
    reached()
