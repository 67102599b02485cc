"""Slicing pass (paper 003): the sliceable model at rate r equals its materialised r-subnet on the demo zoo,
the architecture matrix and random graphs; nested prefixes, MACs, rescale, BatchNorm → GroupNorm, unit
sorting, gradients, budgets, errors and ONNX parity."""

from __future__ import annotations

import copy
import functools
import math
from collections import Counter
from fractions import Fraction

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.architectures import ARCH_IDS, traced
from helpers.pruning import assert_close, assert_unchanged, randomized, state_snapshot
from helpers.random_models import build_random_net, random_net_specs
from helpers.reached import at_least, reached
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from zoocompiler.core.errors import BudgetError, PassError, ZooError
from zoocompiler.data import load_dataset
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.costs import total_cost
from zoocompiler.passes.analysis.plans import unit_scores
from zoocompiler.passes.analysis.unit_rules import PRODUCER_ROLES
from zoocompiler.passes.rewrite import slicing as slicing_module
from zoocompiler.passes.rewrite.slicing import (
    SliceableModel,
    SlicedModel,
    convert_batchnorm,
    kept_units,
    make_sliceable,
    rate_for_budget,
    sort_units,
)
from zoocompiler.sources import load_model
from zoocompiler.zoo import get_entry

# GroupNorm groups per zoo model: 8 divides every BatchNorm width; DenseNet's widths (growth 12) only share 3.
ZOO_GROUPS = {"vgg_s": 8, "resnet_s": 8, "mobilenetv3_s": 8, "convnext_t": 8, "vit_t": 8, "densenet_s_0to4": 3,
              "regnet_s_5to9": 8}
ZOO = list(ZOO_GROUPS)
# Models whose kept units are literal prefixes of every weight dim (no stacked q/k/v, no grouped convs).
PREFIX_MODELS = ["vgg_s", "resnet_s", "mobilenetv3_s", "convnext_t"]
LIGHT_ARCHS = ("tv_shufflenet_v2_x0_5", "timm_resnet18", "tv_mobilenet_v3_small", "timm_convnext_atto",
               "timm_vit_tiny")

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These models are tiny: one torch thread is faster than two and does not collapse on a busy machine
    (spinning OpenMP workers made the default run ~5× slower under load). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fresh_input(shape: tuple[int, ...], batch: int = 3, seed: int = 1) -> torch.Tensor:
    """A batch that is not the trace's example (other size, other values)."""
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


@functools.cache
def zoo_traced(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """(analysed trace, example input) of a trained demo-zoo model; shares the model's weights: do not mutate."""
    x = torch.randn(2, *get_entry(name).input_shape, generator=torch.Generator().manual_seed(0))
    return trace(load_model(f"zoo:{name}"), x), x


@functools.cache
def zoo_sliceable(name: str) -> SliceableModel:
    """The default (dense rescale, unsorted) sliceable zoo model in eval mode; tests set the rate they use."""
    return make_sliceable(zoo_traced(name)[0], groups=ZOO_GROUPS[name]).eval()


@functools.cache
def zoo_slice(name: str, rate: float) -> SlicedModel:
    """``zoo_sliceable(name).slice(rate)``, materialised once per process; do not mutate."""
    return zoo_sliceable(name).slice(rate)


def groups_for(gm: torch.fx.GraphModule) -> int:
    """The largest of 16, 8, 4, 2, 1 dividing every BatchNorm width of ``gm``."""
    widths = [m.num_features for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return next(g for g in (16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))


def rates_to_check(groups: int) -> list[float]:
    """Those of 1, 3/4, 1/2, 3/8, 5/16, 1/3, 2/3 and 1/G that are multiples of 1/G (always one off the 1/4 grid)."""
    wanted = [1.0, 0.75, 0.5, 3 / 8, 5 / 16, 1 / 3, 2 / 3, 1 / groups]
    picked = sorted({r for r in wanted if abs(r * groups - round(r * groups)) < 1e-9}, reverse=True)
    assert any(abs(r * 4 - round(r * 4)) > 1e-9 for r in picked)  # a rate the 1/4 grid does not contain
    return picked


def assert_sliced_equals_sliceable(
    sm: SliceableModel, x: torch.Tensor, rates: list[float], sliced=None
) -> dict[float, torch.Tensor]:
    """For every rate: ``set_rate(r); sm(x)`` (masked, the reference) equals ``sm.slice(r).module(x)`` and the
    views execution (≤ 1e-5 relative; ``sliced(r)`` replaces ``sm.slice(r)`` when given). Returns the outputs by
    rate."""
    outputs = {}
    for r in rates:
        assert sm.set_rate(r) == pytest.approx(r, abs=1e-12)
        with torch.no_grad():
            expected = sm(x)
            got = (sliced or sm.slice)(r).module(x)
            sm.execution = "views"
            on_views = sm(x)
            sm.execution = "masked"
        assert got.shape == expected.shape
        assert_close(got, expected, expected.abs().max().item())
        assert_close(on_views, expected, expected.abs().max().item())
        outputs[r] = expected
    sm.set_rate(1.0)
    return outputs


def removed_positions(sm: SliceableModel, rate: float) -> dict[tuple[str, int], set[int]]:
    """(parameter, dim) → positions outside the r-subnet: units ``u >= kept_units(size, r)`` of every prunable
    group, read from the group members (the test's own oracle for the prefix plan)."""
    out: dict[tuple[str, int], set[int]] = {}
    for g in graph_info(sm.gm).unit_groups:
        if g.pinned:
            continue
        k = kept_units(g.size, rate)
        for m in g.members:
            gone = {p for u in range(k, g.size) for p in m.indices[u]}
            if m.param is not None and gone:
                out.setdefault((m.param, m.dim), set()).update(gone)
    return out


def _copy_analysed(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` with its analysis (deepcopy alone drops ``gm.meta``)."""
    new = copy.deepcopy(gm)
    new.meta["zc"] = copy.deepcopy(graph_info(gm))
    return new


def linear_input_dims(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Weight → its input dim, for weights the analysis consumes as linear inputs (nn.Linear, F.linear, x @ W)."""
    return {m.param: m.dim for g in graph_info(gm).unit_groups for m in g.members if m.role == "linear_in" and m.param}


def linear_weights(gm: torch.fx.GraphModule) -> set[str]:
    return set(linear_input_dims(gm))


def expected_subnet_tensor(sm: SliceableModel, name: str, removed: dict[tuple[str, int], set[int]]) -> torch.Tensor:
    """The full parameter restricted to its kept positions; a linear weight with M inputs of which k are kept
    is also multiplied by M / k (dense rescale, §3.5.1)."""
    full = sm.gm.get_parameter(name).detach()
    t = full
    for dim in range(t.dim()):
        gone = removed.get((name, dim), set())
        t = t.index_select(dim, torch.tensor([p for p in range(t.shape[dim]) if p not in gone], dtype=torch.long))
    d = linear_input_dims(sm.gm).get(name)
    if sm.rescale == "dense" and d is not None and t.shape[d] < full.shape[d]:
        t = t * (full.shape[d] / t.shape[d])
    return t


# ----------------------------------------------------------------------------- 1. sliceable == sliced


def test_kept_units_rounds_half_up_and_keeps_one():
    assert [kept_units(10, r) for r in (0.05, 0.1, 0.25, 0.5, 1.0)] == [1, 1, 3, 5, 10]
    assert kept_units(3, 0.5) == 2  # 1.5 rounds up
    assert kept_units(16, 5 / 16) == 5 and kept_units(7, 1.0) == 7
    assert kept_units(100, 1e-6) == 1


@pytest.mark.parametrize("name", ZOO)
def test_zoo_sliceable_equals_sliced(name):
    sm = zoo_sliceable(name)
    assert sm.groups == ZOO_GROUPS[name]
    assert [round(r * sm.groups) for r in sm.valid_rates()] == list(range(1, sm.groups + 1))
    rates = rates_to_check(sm.groups)
    x = fresh_input(get_entry(name).input_shape)
    outputs = assert_sliced_equals_sliceable(sm, x, rates, functools.partial(zoo_slice, name))
    # not vacuous: the smallest subnet computes something else than the full network
    assert (outputs[1.0] - outputs[min(rates)]).abs().max().item() > 1e-2
    assert all(sm.subnet_view(r) is not None for r in rates)  # the views execution ran each subnet's own graph


def test_densenet_widths_need_a_common_group_count():
    """DenseNet (growth 12) has BatchNorm widths 24, 30, 33, 36, ...: only G = 3 divides them all."""
    gm, _ = zoo_traced("densenet_s_0to4")
    with pytest.raises(PassError, match=r"'features\.denseblock1\.denselayer2\.norm1' has 36 channels.* 8 groups"):
        make_sliceable(gm, groups=8)
    with pytest.raises(PassError, match=r"'features\.denseblock2\.denselayer1\.norm1' has 30 channels.* 4 groups"):
        make_sliceable(gm, groups=4)
    assert zoo_sliceable("densenet_s_0to4").valid_rates() == [1 / 3, 2 / 3, 1.0]


HEAVY = [a for a in ARCH_IDS if a not in LIGHT_ARCHS]


@pytest.mark.parametrize("arch_id", [*LIGHT_ARCHS, *(pytest.param(a, marks=pytest.mark.slow) for a in HEAVY)])
def test_architecture_sliceable_equals_sliced(arch_id):
    _, x, base = traced(arch_id)
    gm = randomized(base)  # no zero-init heads or 1e-6 layer scales hiding a sliced unit
    sm = make_sliceable(gm, groups=groups_for(gm)).eval()
    assert any(g.prunable for g in graph_info(sm.gm).unit_groups)
    rates = [0.5, 3 / 8, 1 / sm.groups]  # rate 1 is covered on the zoo; these three keep the default run short
    x2 = fresh_input(tuple(x.shape[1:]), batch=2, seed=11)
    outputs = assert_sliced_equals_sliceable(sm, x2, rates)
    with torch.no_grad():
        assert (sm.gm(x2) - outputs[1 / sm.groups]).abs().max().item() > 1e-3


def _has_uneven_units(gm: torch.fx.GraphModule) -> bool:
    """Some prunable group has a parameter member whose units span different numbers of positions (e.g. a
    concat of 4-channel branches feeding a conv with 3-channel groups): such units cannot be permuted."""
    return any(len({len(ix) for ix in m.indices}) > 1 for g in graph_info(gm).unit_groups if g.prunable
               for m in g.members if m.param is not None)


def _check_sorting_is_exact(gm: torch.fx.GraphModule, x: torch.Tensor) -> None:
    """sort_units on a copy preserves the output (BatchNorm statistics move with their units), or refuses a
    group whose units have uneven widths."""
    ranked = _copy_analysed(gm)
    try:
        sort_units(ranked, "l1")
    except PassError as err:
        assert "units have different widths" in str(err) and _has_uneven_units(gm)
        return
    with torch.no_grad():
        ref = gm(x)
        assert_close(ranked(x), ref, ref.abs().max().item())


def _bn_widths(net: nn.Module) -> list[int]:
    return [m.num_features for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def _random_sliceable_case(spec, seed: int, groups: int, rescale: str) -> None:
    kwargs, shape = spec
    net = build_random_net(kwargs, seed=seed)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    gm = trace(net, x)
    snap = state_snapshot(gm)
    x2 = fresh_input(shape, batch=3, seed=seed + 1)
    _check_sorting_is_exact(gm, x2)
    bad = [w for w in _bn_widths(net) if w % groups]
    if bad:
        with pytest.raises(PassError, match=f"has {bad[0]} channels, not a multiple of {groups} groups"):
            make_sliceable(gm, groups=groups, rescale=rescale)
        return
    if not any(g.prunable for g in graph_info(gm).unit_groups):
        with pytest.raises(PassError, match="no sliceable unit group"):
            make_sliceable(gm, groups=groups, rescale=rescale)
        return
    sm = make_sliceable(gm, groups=groups, rescale=rescale).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sm.gm.modules())
    assert_sliced_equals_sliceable(sm, x2, sm.valid_rates())
    assert_unchanged(gm, snap)
    reached()


# A hand-picked net with every block kind, including the pre-existing grouped conv + GroupNorm(4).
ALL_BLOCKS = ({"in_ch": 3, "stem": 16, "blocks": [("grouped", 4), ("residual", None), ("split", None),
                                                  ("attention", 2), ("se", 4), ("depthwise", 24), ("conv", 16),
                                                  ("inception", (4, 8, 4))],
               "head": "flatten", "classes": 3, "size": 4}, (3, 4, 4))


# Examples per run that must get past the early returns (a BatchNorm width the group count does not divide,
# no sliceable group) to the sliceable == sliced check (helpers.reached). Sampled: 243 of 300 generated cases
# reach it with max_blocks=4 and groups in {2, 4, 8}, 277 of 300 with max_blocks=6 and groups in {1, 2, 4, 8}.
# 7 = the 2 @examples + 5 of 15 generated (P(fewer) ~ 1e-5); 150 of 200 is 9 standard deviations below 185.
@at_least(7)
@settings(max_examples=15, deadline=None)
@given(spec=random_net_specs(max_blocks=4), seed=st.integers(0, 10_000), groups=st.sampled_from([2, 4, 8]),
       rescale=st.sampled_from(["dense", "none"]))
@example(spec=ALL_BLOCKS, seed=0, groups=4, rescale="dense")
@example(spec=ALL_BLOCKS, seed=1, groups=8, rescale="none")
def test_random_sliceable_equals_sliced(spec, seed, groups, rescale):
    _random_sliceable_case(spec, seed, groups, rescale)


@pytest.mark.slow
@at_least(150)
@settings(max_examples=200, deadline=None)
@given(spec=random_net_specs(max_blocks=6), seed=st.integers(0, 10_000), groups=st.sampled_from([1, 2, 4, 8]),
       rescale=st.sampled_from(["dense", "none"]))
def test_random_sliceable_equals_sliced_many(spec, seed, groups, rescale):
    _random_sliceable_case(spec, seed, groups, rescale)


class _MatmulHead(nn.Module):
    """conv → pool → ``x @ W`` with a (channels, classes) parameter: a linear consumer whose input dim is 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.w = nn.Parameter(torch.randn(16, 5))

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3)) @ self.w


@pytest.mark.parametrize("rescale", [
    "dense",
    "none",
])
def test_matmul_weight_consumer_sliceable_equals_sliced(rescale):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = trace(_MatmulHead().eval(), x)
    roles = {(m.param, m.dim, m.role) for g in graph_info(gm).unit_groups for m in g.members if m.param == "w"}
    assert roles == {("w", 0, "linear_in"), ("w", 1, "linear_out")}
    sm = make_sliceable(gm, groups=4, rescale=rescale).eval()
    assert_sliced_equals_sliceable(sm, fresh_input((3, 8, 8)), [0.5, 0.25])


# ----------------------------------------------------------------------------- 2. nested prefixes


@pytest.mark.parametrize("name", ZOO)
def test_subnet_parameters_are_the_kept_slices(name):
    """Every r-subnet parameter is the full one restricted to the kept units (times M / kept on linear inputs)."""
    sm = zoo_sliceable(name)
    for r in (0.5, sm.valid_rates()[0]):
        sub = zoo_slice(name, r).module
        removed = removed_positions(sm, r)
        names = dict(sub.named_parameters())
        assert names.keys() == dict(sm.gm.named_parameters()).keys()
        shrunk = 0
        for pname, p in names.items():
            expected = expected_subnet_tensor(sm, pname, removed)
            assert p.shape == expected.shape, pname
            assert torch.allclose(p, expected, rtol=1e-6, atol=0), pname
            shrunk += p.shape != sm.gm.get_parameter(pname).shape
        assert shrunk >= 4


@pytest.mark.parametrize("name", PREFIX_MODELS)
def test_subnet_weights_are_literal_prefixes(name):
    """CNNs: ``sub_w == full_w[:k_out, :k_in, ...]``; linear weights with fewer inputs also carry M / k_in."""
    sm = zoo_sliceable(name)
    sub = zoo_slice(name, 0.375).module
    linear = linear_weights(sm.gm)
    for pname, p in sub.named_parameters():
        full = sm.gm.get_parameter(pname).detach()
        expected = full[tuple(slice(0, n) for n in p.shape)]
        if pname in linear and p.shape[1] < full.shape[1]:
            expected = expected * (full.shape[1] / p.shape[1])
        assert torch.equal(p, expected), pname


def test_subnets_are_nested():
    """The 3/8-subnet's weights are prefixes of the 5/8-subnet's (rescale off, so no factors in between)."""
    sm = make_sliceable(zoo_traced("resnet_s")[0], groups=8, rescale="none")
    small, large = sm.slice(3 / 8).module, sm.slice(5 / 8).module
    bigger = dict(large.named_parameters())
    for pname, p in small.named_parameters():
        assert torch.equal(p, bigger[pname][tuple(slice(0, n) for n in p.shape)]), pname
    assert sm.slice(3 / 8).params < sm.slice(5 / 8).params < sm.slice(1.0).params


def test_grouped_conv_keeps_a_prefix_per_conv_group():
    """RegNet's grouped convs (group width 8) keep the same prefix in every conv group, not a flat prefix:
    s1.b1.conv1 has 16 outputs feeding a 2-group conv, a unit is 2 channels in each group (the GroupNorm
    coupling), so 3/8 keeps 2 of 4 units = channels 0-3 and 8-11. Larger subnets still contain smaller ones."""
    sm = zoo_sliceable("regnet_s_5to9")
    full = sm.gm.get_parameter("s1.b1.conv1.conv.weight").detach()
    sub = zoo_slice("regnet_s_5to9", 3 / 8).module.get_parameter("s1.b1.conv1.conv.weight")
    assert full.shape[:2] == (16, 16) and sub.shape[:2] == (8, 6)
    assert torch.equal(sub, full[[0, 1, 2, 3, 8, 9, 10, 11], :6])
    rates = sm.valid_rates()
    for small, large in zip(rates, rates[1:]):
        removed_small, removed_large = removed_positions(sm, small), removed_positions(sm, large)
        assert all(gone <= removed_small[key] for key, gone in removed_large.items())


# ----------------------------------------------------------------------------- 3. MACs


@pytest.mark.parametrize("name", ZOO)
def test_macs_non_decreasing_in_rate(name):
    sm = zoo_sliceable(name)
    macs = [sm.macs_at(r) for r in sm.valid_rates()]
    assert macs == sorted(macs) and macs[0] < macs[-1]
    batch = zoo_traced(name)[1].shape[0]
    assert macs[-1] == total_cost(sm.gm).macs // batch


def test_vgg_macs_follow_r_squared():
    """vgg_s widths are multiples of 8, so at r = j/8 each layer keeps exactly r·C of each sliced side: the
    first conv (1 pinned input) and the classifier's last linear (pinned classes) scale by r, every other
    layer by r². Those two hold 3 % of the MACs, so macs(r)/macs(1) lies within 0.25·3 % < 0.01 of r²."""
    sm = zoo_sliceable("vgg_s")
    conv0, last = sm.gm.get_submodule("features.0"), sm.gm.get_submodule("classifier.3")
    h, w = get_entry("vgg_s").input_shape[1:]
    edge = conv0.out_channels * conv0.in_channels * conv0.kernel_size[0] * conv0.kernel_size[1] * h * w
    edge += last.in_features * last.out_features
    full = sm.macs_at(1.0)
    assert 0.02 < edge / full < 0.04
    for r in sm.valid_rates():
        q = Fraction(round(r * 8), 8)
        assert sm.macs_at(r) == q * q * (full - edge) + q * edge, r
        ratio = sm.macs_at(r) / full
        assert r * r <= ratio <= min(r, r * r + 0.01)


@pytest.mark.parametrize("name", ["vgg_s", "mobilenetv3_s", "vit_t"])
def test_macs_at_equals_flop_counter_on_subnet(name):
    sm = zoo_sliceable(name)
    x = fresh_input(get_entry(name).input_shape, batch=3)
    for r in (1.0, 0.5, 3 / 8):
        sliced = zoo_slice(name, r)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            sliced.module(x)
        assert counter.get_total_flops() // 2 // 3 == sliced.macs == sm.macs_at(r)


# ----------------------------------------------------------------------------- 4. rescale


def test_dense_rescale_scales_linear_inputs_only():
    sm = zoo_sliceable("vgg_s")  # classifier: Linear(64→128), ReLU, Linear(128→10)
    assert sm.rescale == "dense"
    full = sm.gm
    sub = zoo_slice("vgg_s", 0.5).module
    hidden = full.get_parameter("classifier.1.weight").detach()
    last = full.get_parameter("classifier.3.weight").detach()
    assert torch.equal(sub.get_parameter("classifier.1.weight"), hidden[:64, :32] * 2.0)  # M / kept = 64 / 32
    assert sub.get_parameter("classifier.1.weight")[0, 0].item() == 2.0 * hidden[0, 0].item()
    assert torch.equal(sub.get_parameter("classifier.3.weight"), last[:, :64] * 2.0)  # 128 / 64
    bias = full.get_parameter("classifier.1.bias")
    assert torch.equal(sub.get_parameter("classifier.1.bias"), bias[:64])  # biases are not rescaled
    sub75 = zoo_slice("vgg_s", 0.75).module
    assert torch.allclose(sub75.get_parameter("classifier.1.weight"), hidden[:96, :48] * (64 / 48), rtol=1e-6, atol=0)
    convs = [(n, m) for n, m in sub.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    for path, conv in convs:
        w = full.get_submodule(path).weight
        assert torch.equal(conv.weight, w[: conv.out_channels, : conv.in_channels]), path


def test_rescale_none_leaves_linear_weights_and_rate_one_is_plain():
    gm, _ = zoo_traced("vgg_s")
    dense, plain = zoo_sliceable("vgg_s"), make_sliceable(gm, groups=8, rescale="none").eval()
    sub = plain.slice(0.5).module
    hidden, last = (plain.gm.get_parameter(f"classifier.{i}.weight") for i in (1, 3))
    assert torch.equal(sub.get_parameter("classifier.1.weight"), hidden[:64, :32])
    assert torch.equal(sub.get_parameter("classifier.3.weight"), last[:, :64])
    x = fresh_input((1, 28, 28))
    with torch.no_grad():
        outs = {}
        for sm in (dense, plain):
            sm.set_rate(0.5)
            outs[sm.rescale, 0.5] = sm(x)
            sm.set_rate(1.0)
            outs[sm.rescale, 1.0] = sm(x)
        reference = dense.gm(x)
    assert (outs["dense", 0.5] - outs["none", 0.5]).abs().max().item() > 1e-2
    assert torch.equal(outs["dense", 1.0], reference) and torch.equal(outs["none", 1.0], reference)
    assert dense.factors(1.0) == {}
    whole = dense.slice(1.0).module
    assert all(torch.equal(p, dense.gm.get_parameter(n)) for n, p in whole.named_parameters())


def test_rate_one_without_batchnorm_is_the_original_network():
    gm, _ = zoo_traced("vit_t")
    sm = zoo_sliceable("vit_t")
    sm.set_rate(1.0)
    x = fresh_input((1, 28, 28))
    with torch.no_grad():
        assert torch.equal(sm(x), gm(x))


# ----------------------------------------------------------------------------- 5. BatchNorm → GroupNorm


@pytest.mark.parametrize("name", ["resnet_s", "mobilenetv3_s"])  # nn.BatchNorm2d, timm BatchNormAct2d
def test_batchnorm_becomes_groupnorm_and_input_is_untouched(name):
    gm, _ = zoo_traced(name)
    x = fresh_input((1, 28, 28))
    snap = state_snapshot(gm)
    with torch.no_grad():
        before = gm(x)
    bns = {p: m for p, m in gm.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert len(bns) >= 5
    sm = make_sliceable(gm, groups=8)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in sm.gm.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in sm.gm.modules()) == len(bns)
    z = torch.randn(2, 8, 5, 5)
    for path, bn in bns.items():
        gn = sm.gm.get_submodule(path)
        assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 8 and gn.num_channels == bn.num_features, path
        assert gn.eps == bn.eps and torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias), path
        assert gn.weight is not bn.weight
        act = getattr(bn, "act", nn.Identity())
        zc = z.repeat(1, bn.num_features // 8, 1, 1)
        with torch.no_grad():
            assert torch.allclose(gn(zc), act(F.group_norm(zc, 8, bn.weight, bn.bias, bn.eps)), atol=1e-6), path
    # the input graph is untouched: same code, same weights and statistics, same modules, same output
    assert_unchanged(gm, snap)
    assert all(isinstance(gm.get_submodule(p), type(m)) for p, m in bns.items())
    with torch.no_grad():
        assert torch.equal(gm(x), before)


def test_sliceable_state_dict_is_gm_under_a_prefix():
    sm = zoo_sliceable("resnet_s")
    assert list(sm.state_dict()) == [f"gm.{k}" for k in sm.gm.state_dict()]


def test_convert_batchnorm_returns_paths_and_names_a_bad_width():
    gm = copy.deepcopy(zoo_traced("vgg_s")[0])
    paths = convert_batchnorm(gm, 8)
    assert paths == ["features.1", "features.5", "features.9", "features.12"]
    assert all(gm.get_submodule(p).num_groups == 8 for p in paths)
    with pytest.raises(PassError, match=r"BatchNorm 'features\.1' has 16 channels, not a multiple of 3 groups"):
        make_sliceable(zoo_traced("vgg_s")[0], groups=3)


# ----------------------------------------------------------------------------- 6. sorting units


def test_sort_units_is_exact_and_puts_the_largest_unit_first():
    base, _ = zoo_traced("resnet_s")  # BatchNorm in eval mode: running statistics must move with their units
    gm = _copy_analysed(base)
    x = fresh_input((1, 28, 28))
    reordered = sort_units(gm, "l1")
    prunable = [g for g in graph_info(gm).unit_groups if g.prunable and g.size > 1]
    assert reordered == len(prunable) == 9
    with torch.no_grad():
        ref = base(x)
        assert_close(gm(x), ref, ref.abs().max().item())
    changed = [n for n, p in gm.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) >= 10
    for g in prunable:
        members = [m for m in g.members if m.param is not None and m.role in PRODUCER_ROLES]
        scores = unit_scores(gm, members, g.size, "l1")
        assert scores[0] == scores.max()
        assert all(a >= b - 1e-9 * scores[0] for a, b in zip(scores, scores[1:]))
    assert sort_units(gm, "l1") == 0  # already sorted
    with pytest.raises(PassError, match="unknown unit importance 'random'"):
        sort_units(gm, "random")


def _uneven_inception_net() -> nn.Module:
    """Inception (3 × 4 channels) → grouped conv with 3-channel groups: concat channel c is in unit c % 3, so
    each branch's units have 2, 1, 1 positions in different places. Weights make unit 0 > unit 2 > unit 1."""
    net = build_random_net({"in_ch": 3, "stem": 8, "blocks": [("inception", (4, 4, 4)), ("grouped", 4)],
                            "head": "pool", "classes": 3, "size": 4}, seed=0)
    with torch.no_grad():
        for branch, first in ((net.blocks[0].b1, 0), (net.blocks[0].b3[2], 4), (net.blocks[0].pool[1], 8)):
            for local in range(4):
                scale = (100.0, 1.0, 10.0)[(first + local) % 3]
                branch.weight[local] *= scale
                branch.bias[local] *= scale
    return net


def test_refused_sort_leaves_the_graph_unchanged():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    gm = trace(_uneven_inception_net(), x)
    snap = state_snapshot(gm)
    with torch.no_grad():
        before = gm(x)
    with pytest.raises(PassError, match="units have different widths"):
        sort_units(gm, "l1")
    with torch.no_grad():
        assert torch.equal(gm(x), before)
    assert_unchanged(gm, snap)


def test_make_sliceable_sorting_refuses_uneven_units_and_leaves_the_input():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    gm = trace(_uneven_inception_net(), x)
    snap = state_snapshot(gm)
    with pytest.raises(PassError, match="'blocks.0.b3.2.weight': units have different widths.*sort_by=None"):
        make_sliceable(gm, groups=4, sort_by="l1")
    assert_unchanged(gm, snap)
    assert make_sliceable(gm, groups=4).valid_rates() == [0.25, 0.5, 0.75, 1.0]


def _relative_error(model: SliceableModel, rate: float, x: torch.Tensor, full: torch.Tensor) -> float:
    model.set_rate(rate)
    with torch.no_grad():
        out = model(x)
    model.set_rate(1.0)
    return ((out - full).norm() / full.norm()).item()


@pytest.mark.parametrize(("name", "rate", "rescale"), [("vit_t", 0.75, "dense"), ("convnext_t", 0.5, "none")])
def test_sorted_prefixes_keep_more_of_the_trained_signal(name, rate, rescale):
    """On test digits, the r-subnet of an l1-sorted trained model is closer to the full output than the
    unsorted one. These models have no BatchNorm, so this is the network before any GroupNorm conversion."""
    gm, _ = zoo_traced(name)
    entry = get_entry(name)
    data = load_dataset(entry.dataset, "test", classes=list(entry.classes))
    x = data.x[:256]
    with torch.no_grad():
        full = gm(x)
    unsorted = make_sliceable(gm, groups=8, rescale=rescale).eval()
    ranked = make_sliceable(gm, groups=8, rescale=rescale, sort_by="l1").eval()
    assert_close(ranked.gm(x), full, full.abs().max().item())  # sorting is exact
    e_unsorted, e_ranked = _relative_error(unsorted, rate, x, full), _relative_error(ranked, rate, x, full)
    assert e_ranked < 0.75 * e_unsorted, (e_ranked, e_unsorted)


# ----------------------------------------------------------------------------- 7. gradients


@pytest.mark.parametrize("name", ["resnet_s", "vit_t"])
def test_gradients_reach_only_the_subnet(name):
    gm, _ = zoo_traced(name)
    sm = make_sliceable(gm, groups=8).eval()
    sm.set_rate(0.5)
    x = fresh_input((1, 28, 28))
    sm(x).sum().backward()
    removed = removed_positions(sm, 0.5)
    assert len(removed) >= 8
    live = 0
    for (pname, dim), gone in removed.items():
        grad = sm.gm.get_parameter(pname).grad
        assert grad is not None, pname
        gone_idx = torch.tensor(sorted(gone))
        kept_idx = torch.tensor([p for p in range(grad.shape[dim]) if p not in gone])
        assert torch.count_nonzero(grad.index_select(dim, gone_idx)) == 0, pname
        live += torch.count_nonzero(grad.index_select(dim, kept_idx)).item() > 0
    assert live >= len(removed) // 2
    # subnet_masks says the same, for every parameter (unsliced ones are all inside)
    masks = sm.subnet_masks(0.5)
    assert masks.keys() == dict(sm.gm.named_parameters()).keys()
    for pname, p in sm.gm.named_parameters():
        inside = torch.ones_like(p, dtype=torch.bool)
        for (name, dim), gone in removed.items():
            if name == pname:
                inside.index_fill_(dim, torch.tensor(sorted(gone)), False)
        assert torch.equal(masks[pname], inside), pname
        assert torch.count_nonzero(p.grad[~inside]) == 0, pname
    # the kept gradients are the r-subnet's own (conv weights: no rescale factor in between)
    sub = sm.slice(0.5).module
    sub(x).sum().backward()
    convs = [f"{p}.weight" for p, m in sub.named_modules() if isinstance(m, nn.Conv2d)]
    for pname in convs:
        full_grad = sm.gm.get_parameter(pname).grad
        g = sub.get_parameter(pname).grad
        restricted = full_grad[tuple(slice(0, n) for n in g.shape)]
        assert torch.allclose(g, restricted, rtol=1e-4, atol=1e-5 * restricted.abs().max().item()), pname


@pytest.mark.parametrize("name", ["vgg_s", "resnet_s", "vit_t"])
def test_one_step_on_subnet_views_equals_one_step_on_the_masked_model(name):
    """Training on the r-subnet's own graph (views of the shared weights) updates the shared weights exactly as the
    full-width masked graph does: same loss, same gradients, same AdamW step (weight decay included)."""
    x = fresh_input(get_entry(name).input_shape, batch=6, seed=5)
    y = torch.arange(6) % 10
    stepped = {}
    for execution in ("masked", "views"):
        sm = make_sliceable(zoo_traced(name)[0], groups=ZOO_GROUPS[name]).eval()  # eval: no dropout draws
        sm.execution, sm.rate = execution, 0.5
        optimizer = torch.optim.AdamW(sm.parameters(), lr=1e-2, weight_decay=0.05)
        loss = F.cross_entropy(sm(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in sm.gm.named_parameters()}
        optimizer.step()
        stepped[execution] = (loss.item(), grads, {n: p.detach().clone() for n, p in sm.gm.named_parameters()})
    (loss_m, grads_m, after_m), (loss_v, grads_v, after_v) = stepped["masked"], stepped["views"]
    assert loss_v == pytest.approx(loss_m, rel=1e-5)
    moved = 0
    for n in after_m:
        assert_close(grads_v[n], grads_m[n], grads_m[n].abs().max().item())
        assert_close(after_v[n], after_m[n], after_m[n].abs().max().item())
        moved += int(torch.count_nonzero(grads_m[n]).item() > 0)
    assert moved >= len(after_m) // 2


def test_views_fall_back_to_masked_only_when_the_subnet_is_not_a_cut(monkeypatch):
    sm = make_sliceable(zoo_traced("vgg_s")[0], groups=ZOO_GROUPS["vgg_s"]).eval()
    view = sm.subnet_view(0.5)
    assert view is not None and view.cuts and all(isinstance(c, int) for cuts in view.cuts.values() for _, c in cuts)
    with pytest.raises(PassError, match="unknown slicing execution 'fast'"):
        sm.execution = "fast"
    assert copy.deepcopy(sm)._views == {}  # the subnet graphs do not travel with the model
    assert all(t.is_meta for t in view.module.state_dict().values())  # the view holds no weights of its own
    sm.to(torch.float32)
    assert sm._views == {}  # moved or cast: the views are rebuilt where the weights are
    # a subnet parameter that is not the cut of a shared one (here: changed after pruning) disables the view
    real = slicing_module.prune

    def altered(*args, **kwargs):
        result = real(*args, **kwargs)
        with torch.no_grad():
            next(result.module.parameters()).add_(1.0)
        return result

    monkeypatch.setattr(slicing_module, "prune", altered)
    other = make_sliceable(zoo_traced("vgg_s")[0], groups=ZOO_GROUPS["vgg_s"]).eval()
    assert other.subnet_view(0.5) is None
    other.execution, other.rate = "views", 0.5
    with torch.no_grad():
        x = fresh_input(get_entry("vgg_s").input_shape)
        got = other(x)
        other.execution = "masked"
        assert torch.equal(got, other(x))


def _onnx_and_sliceable(sm: SliceableModel, path, x: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ONNX Runtime's output of the model at ``path``, the sliceable model's output at ``rate``) on ``x``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    sm.set_rate(rate)
    with torch.no_grad():
        expected = sm(x)
    sm.set_rate(1.0)
    return torch.from_numpy(got), expected


@pytest.mark.parametrize(("name", "exporter"), [("vgg_s", "torchscript"), ("resnet_s", "dynamo"),
                                              ("mobilenetv3_s", "torchscript")])  # nn.GroupNorm; timm GroupNormAct
def test_exported_groupnorm_affine_is_one_batchnorm_and_equals_the_sliceable_model(name, exporter, tmp_path):
    """The exported r-subnet has each GroupNorm's affine map as one BatchNormalization instead of Mul + Add
    (exports/onnx_rewrites.py) and ONNX Runtime's output equals the masked sliceable model at r (≤ 1e-5 of the
    output scale)."""
    sm = zoo_sliceable(name)
    _, x = zoo_traced(name)
    other = fresh_input(get_entry(name).input_shape, batch=3, seed=4)
    for r in (1.0, 0.5) if name == "vgg_s" else (0.5,):
        module = zoo_slice(name, r).module
        norms = sum(isinstance(m, nn.GroupNorm) for m in module.modules())
        ops = {}
        for rewrites in (False, True):
            path = tmp_path / f"{name}_{r}_{rewrites}.onnx"
            export_onnx(module, x, path, exporters=(exporter,), rewrites=rewrites)
            ops[rewrites] = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        assert norms > 0 and ops[True]["InstanceNormalization"] == norms
        assert ops[True]["BatchNormalization"] - ops[False]["BatchNormalization"] == norms
        assert (ops[False]["Mul"] - ops[True]["Mul"], ops[False]["Add"] - ops[True]["Add"]) == (norms, norms)
        got, expected = _onnx_and_sliceable(sm, path, other, r)
        assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


# ----------------------------------------------------------------------------- 8. budgets


def _brute_force(sm: SliceableModel, budget: int, lb: float | None) -> float | None:
    fits = [r for r in sm.valid_rates(lb) if sm.macs_at(r) <= budget]
    return max(fits) if fits else None


@pytest.mark.parametrize("name", ["vgg_s", "vit_t"])
def test_rate_for_budget_is_the_largest_fitting_rate(name):
    sm = zoo_sliceable(name)
    macs = [sm.macs_at(r) for r in sm.valid_rates()]
    budgets = sorted({b for m in macs for b in (m - 1, m, m + 1)} | {10 * macs[-1]})
    for lb in (None, 0.5):
        lowest = sm.valid_rates(lb)[0]
        for budget in budgets:
            best = _brute_force(sm, budget, lb)
            if best is None:
                with pytest.raises(BudgetError, match=f"{sm.macs_at(lowest):,} MACs"):
                    rate_for_budget(sm, flops=budget, lb=lb)
            else:
                assert rate_for_budget(sm, flops=budget, lb=lb) == best, (budget, lb)
    assert rate_for_budget(sm, flops=sm.macs_at(0.5)) == 0.5
    with pytest.raises(BudgetError, match=r"rate 0\.5: .* at least " + f"{sm.macs_at(0.5):,}"):
        rate_for_budget(sm, flops=sm.macs_at(0.5) - 1, lb=0.5)
    with pytest.raises(BudgetError, match="must be positive"):
        rate_for_budget(sm, flops=0)


# ----------------------------------------------------------------------------- 9. errors


class _RollsChannels(nn.Module):
    """conv → roll along channels (an op that pins the group) → pool → linear: every group is pinned."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.roll(self.conv(x), 1, dims=1).mean((2, 3)))


@pytest.mark.parametrize(("model", "shape"), [(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (3, 2, 2)),
                                              (_RollsChannels(), (3, 8, 8))], ids=["single_linear", "pinned"])
def test_no_sliceable_group_is_an_error(model, shape):
    gm = trace(model.eval(), torch.randn(2, *shape))
    assert graph_info(gm).unit_groups and not any(g.prunable for g in graph_info(gm).unit_groups)
    with pytest.raises(PassError, match="no sliceable unit group"):
        make_sliceable(gm, groups=4)


@pytest.mark.parametrize("rate", [0.0, -0.25, 1.5, float("nan"), float("inf")])
def test_rates_outside_unit_interval_raise(rate):
    sm = zoo_sliceable("vgg_s")
    sm.set_rate(0.5)
    for call in (sm.set_rate, sm.slice, sm.macs_at, sm.prefix_plan, sm.factors):
        with pytest.raises(ZooError, match="not in"):
            call(rate)
    assert sm.rate == 0.5
    assert sm.set_rate(0.49) == 0.5 and sm.set_rate(0.01) == 1 / 8  # in range: snapped to the 1/8 grid
    sm.set_rate(1.0)


def test_bad_arguments_raise_pass_errors():
    gm, x = zoo_traced("vgg_s")
    with pytest.raises(PassError, match="unknown rescale mode 'linear'"):
        make_sliceable(gm, rescale="linear")
    with pytest.raises(PassError, match="groups must be >= 1"):
        make_sliceable(gm, groups=0)
    with pytest.raises(PassError, match="no example input or unit groups"):
        make_sliceable(trace(load_model("zoo:vgg_s"), x, analyze=False), groups=8)


def test_layernorm_pruned_trace_is_refused():
    _, x = zoo_traced("vit_t")
    gm = trace(load_model("zoo:vit_t"), x, layernorm_streams="prune")
    with pytest.raises(PassError, match="layernorm_streams='prune'"):
        make_sliceable(gm, groups=8)


# ----------------------------------------------------------------------------- 10. ONNX


@pytest.mark.parametrize("name", ["vgg_s", "resnet_s"])
def test_sliced_onnx_matches_sliceable(name, tmp_path):
    sm = zoo_sliceable(name)
    _, x = zoo_traced(name)
    other = fresh_input(get_entry(name).input_shape, batch=3, seed=4)
    for r in (0.5, 3 / 8):
        path = tmp_path / f"{name}_{round(r * sm.groups)}.onnx"
        report = export_onnx(zoo_slice(name, r).module, x, path)
        got, expected = _onnx_and_sliceable(sm, path, other, r)
        scale = max(1.0, expected.abs().max().item())
        assert report.max_abs_diff <= 1e-4 * scale
        assert math.isfinite(float(got.max()))
        assert (got - expected).abs().max().item() <= 1e-4 * scale
