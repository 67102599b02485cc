"""Physical prune on the architecture matrix: pruned == masked reference, ONNX parity, exact parameter
counts, plan JSON round trip and replay, residual strategies, bad plans, node-argument rewrites."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.architectures import ARCH_IDS, fresh_model, traced
from helpers.pruning import (
    assert_close,
    assert_unchanged,
    expected_params,
    random_plan,
    randomized,
    state_snapshot,
)

from zoocompiler.core.errors import PassError
from zoocompiler.core.modules import count_params
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.plans import (
    Plan,
    graph_fingerprint,
    group_keys,
    groups_by_key,
    plan_by_importance,
)
from zoocompiler.passes.rewrite.prune import masked_reference, prune

ONNX_ARCHS = {"tv_resnet18", "tv_mobilenet_v3_small", "timm_vit_tiny", "tv_shufflenet_v2_x0_5"}

# ----------------------------------------------------------------------------- architecture matrix


HEAVY_ARCHS = {"tv_resnet50", "tv_densenet121", "tv_efficientnet_b0", "tv_vit_b_16", "tv_swin_t", "tv_convnext_tiny",
               "timm_efficientnet_b0", "tv_regnet_y_400mf", "timm_deit_tiny"}
MATRIX = [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY_ARCHS else a for a in ARCH_IDS]


@pytest.mark.parametrize("arch_id", MATRIX)
def test_architecture_prune_equals_masked_reference(arch_id, tmp_path):
    _, x, base = traced(arch_id)
    gm = randomized(base)
    snap = state_snapshot(gm)
    with torch.no_grad():
        ref_scale = gm(x).abs().max().item()
    plan = random_plan(gm, seed=zlib.crc32(arch_id.encode()) % 1000)
    if not plan.keep:
        pytest.skip(f"{arch_id} has no prunable group")
    result = prune(gm, plan, strategy_macs=False)
    with torch.no_grad():
        pruned_out = result.module(x)
        masked_out = masked_reference(gm, plan)(x)
    assert_close(pruned_out, masked_out, ref_scale)
    assert count_params(result.module) == expected_params(gm, plan) == result.report.params_after
    assert result.report.params_after < result.report.params_before
    assert result.report.macs_after < result.report.macs_before
    assert_unchanged(gm, snap)
    if arch_id in ONNX_ARCHS:
        report = export_onnx(result.module, x, tmp_path / "pruned.onnx")
        assert report.max_abs_diff <= 1e-4 * max(1.0, ref_scale)


@pytest.mark.slow
@pytest.mark.parametrize("arch_id", sorted(set(ARCH_IDS) - ONNX_ARCHS))
def test_architecture_pruned_onnx_parity(arch_id, tmp_path):
    _, x, base = traced(arch_id)
    gm = randomized(base)
    plan = random_plan(gm, seed=7)
    if not plan.keep:
        pytest.skip(f"{arch_id} has no prunable group")
    result = prune(gm, plan, strategy_macs=False)
    report = export_onnx(result.module, x, tmp_path / "pruned.onnx")
    with torch.no_grad():
        scale = gm(x).abs().max().item()
    assert report.max_abs_diff <= 1e-4 * max(1.0, scale)


# ----------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("arch_id", ["tv_resnet18", pytest.param("tv_resnet50", marks=pytest.mark.slow)])
def test_residual_strategies_equal_their_references(arch_id, tmp_path):
    _, x, base = traced(arch_id)
    gm = randomized(base)
    with torch.no_grad():
        scale = gm(x).abs().max().item()
    plan = random_plan(gm, seed=3)
    assert len(plan.producer_keep) >= 4  # residual streams have several producers
    macs = {}
    for strategy in ("union", "intersection", "pad"):
        p = plan.with_strategy(strategy)
        result = prune(gm, p, strategy_macs=strategy == "pad")
        with torch.no_grad():
            assert_close(result.module(x), masked_reference(gm, p)(x), scale)
        macs[strategy] = result.report.macs_after
        if strategy == "pad":
            assert result.report.scatters >= len(plan.producer_keep)
            assert result.report.macs_by_strategy == macs
        if strategy != "pad":
            assert count_params(result.module) == expected_params(gm, p)
    assert macs["intersection"] < macs["pad"] < macs["union"]
    if arch_id == "tv_resnet18":
        pad = prune(gm, plan.with_strategy("pad"), strategy_macs=False).module
        assert export_onnx(pad, x, tmp_path / "pad.onnx").max_abs_diff <= 1e-4 * max(1.0, scale)


def test_pad_masked_reference_differs_from_union():
    """pad is not union: the producers' own units really are zeroed per producer."""
    _, x, base = traced("tv_resnet18")
    gm = randomized(base)
    plan = random_plan(gm, seed=5)
    with torch.no_grad():
        union = masked_reference(gm, plan.with_strategy("union"))(x)
        pad = masked_reference(gm, plan.with_strategy("pad"))(x)
    assert (union - pad).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------- plans


def test_plan_json_round_trip_and_replay_on_fresh_trace(tmp_path):
    _, x, gm = traced("tv_resnet18")
    plan = plan_by_importance(gm, 0.5, importance="l2", strategy="pad")
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded == plan and Plan.from_json(plan.to_json()) == plan
    fresh = trace(fresh_model("tv_resnet18"), x)  # a new trace of a new copy (seed 0, load_model(spec).eval())
    assert group_keys(fresh) == group_keys(gm) and graph_fingerprint(fresh) == graph_fingerprint(gm)
    with torch.no_grad():
        a = prune(gm, plan, strategy_macs=False).module(x)
        b = prune(fresh, loaded, strategy_macs=False).module(x)
    assert torch.equal(a, b)


def test_plan_by_importance_counts_and_round_to():
    _, x, gm = traced("tv_resnet18")
    by_key = groups_by_key(gm)
    plan = plan_by_importance(gm, 0.5, importance="l1")
    assert set(plan.keep) == {k for k, g in by_key.items() if g.prunable}
    for key, keep in plan.keep.items():
        if key not in plan.producer_keep:
            assert len(keep) == by_key[key].size // 2 and keep == sorted(set(keep))
    # l1 keeps the largest filters of a single-producer group
    key = "layer1.0.conv1.weight:conv_out"
    w = gm.get_parameter("layer1.0.conv1.weight").detach().abs().sum((1, 2, 3))
    assert plan.keep[key] == sorted(w.argsort(descending=True)[:32].tolist())
    rounded = plan_by_importance(gm, 0.6, importance="random", round_to=24, seed=3)
    for key, keep in rounded.keep.items():
        assert len(keep) % 24 == 0 and 0 < len(keep) <= by_key[key].size
    assert rounded == plan_by_importance(gm, 0.6, importance="random", round_to=24, seed=3)
    assert rounded != plan_by_importance(gm, 0.6, importance="random", round_to=24, seed=4)
    out = prune(gm, rounded, strategy_macs=False).module
    assert all(m.out_channels % 24 == 0 for m in out.modules() if isinstance(m, nn.Conv2d) and m.out_channels < 1000)


# ----------------------------------------------------------------------------- bad plans


@pytest.fixture(scope="module")
def resnet_plan():
    _, x, gm = traced("tv_resnet18")
    gm = copy.deepcopy(gm)  # test_divisibility_violation edits a group: not on the shared trace
    return gm, x, plan_by_importance(gm, 0.5)


def _expect_error(gm, plan, *fragments):
    snap = state_snapshot(gm)
    with pytest.raises(PassError) as err:
        prune(gm, plan)
    with pytest.raises(PassError):
        masked_reference(gm, plan)
    text = str(err.value)
    assert "\n" not in text and all(f in text for f in fragments), text
    assert_unchanged(gm, snap)


def test_bad_plans_name_group_and_rule(resnet_plan):
    gm, _, plan = resnet_plan
    key = "layer1.0.conv1.weight:conv_out"
    bad = copy.deepcopy(plan)
    bad.keep[key] = [0, 64]
    _expect_error(gm, bad, key, "out of range")
    bad.keep[key] = [3, 3, 5]
    _expect_error(gm, bad, key, "twice")
    bad.keep[key] = []
    _expect_error(gm, bad, key, "emptied")
    bad = copy.deepcopy(plan)
    pinned = next(k for k, g in groups_by_key(gm).items() if g.pinned)
    bad.keep[pinned] = [0]
    _expect_error(gm, bad, pinned, "pinned")
    bad = copy.deepcopy(plan)
    bad.strategy = "zigzag"
    _expect_error(gm, bad, "unknown strategy")
    bad = copy.deepcopy(plan)
    stream = next(iter(plan.producer_keep))
    bad.producer_keep[stream]["fc.weight"] = [0]
    _expect_error(gm, bad, stream, "not one of its producers")


def test_divisibility_violation(resnet_plan):
    gm, _, plan = resnet_plan
    key = "layer1.0.conv1.weight:conv_out"
    group = groups_by_key(gm)[key]
    group.divisible_by.append(5)
    try:
        _expect_error(gm, plan, key, "divisible_by 5")
    finally:
        group.divisible_by.remove(5)


def test_plan_for_another_model(resnet_plan):
    gm, _, plan = resnet_plan
    _, _, other = traced("tv_resnet50")
    _expect_error(other, plan, "another model")
    unfingerprinted = copy.deepcopy(plan)
    unfingerprinted.meta.pop("fingerprint")
    unfingerprinted.keep["not.a.layer.weight:conv_out"] = [0]
    _expect_error(gm, unfingerprinted, "not.a.layer.weight:conv_out", "another model")


def test_malformed_plan_json(tmp_path):
    with pytest.raises(PassError, match="not valid JSON"):
        Plan.from_json("{keep:")
    with pytest.raises(PassError, match="malformed"):
        Plan.from_json('{"keep": {"a": "xy"}}')
    with pytest.raises(PassError, match="cannot read plan"):
        Plan.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- node arguments


class ArgOps(nn.Module):
    """Slices, unequal chunks, split sections, a literal reshape, GroupNorm, heads, flatten → linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.a = nn.Conv2d(6, 6, 1)
        self.b = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.heads = 2
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        y = F.relu(self.gn(self.stem(x)))
        p, q = torch.split(y, [6, 10], dim=1)
        z = torch.cat([self.a(p), self.b(q)], dim=1)
        b, c, h, w = z.shape
        t = z.flatten(2).transpose(1, 2)
        qkv = self.qkv(t).reshape(b, h * w, 3, self.heads, 8).permute(2, 0, 3, 1, 4)
        qh, kh, vh = qkv.unbind(0)
        att = (qh @ kh.transpose(-2, -1)).softmax(-1) @ vh
        t = self.proj(att.transpose(1, 2).reshape(b, h * w, 16))
        z = t.transpose(1, 2).reshape(b, 16, h, w)
        return self.fc(z.flatten(1))


def test_node_arguments_are_rewritten(tmp_path):
    torch.manual_seed(0)
    model = ArgOps().eval()
    x = torch.randn(2, 3, 4, 4)
    gm = randomized(trace(model, x))
    by_key = groups_by_key(gm)
    plan = Plan(meta={"fingerprint": graph_fingerprint(gm)})
    for key, g in by_key.items():
        if g.prunable and g.size >= 2:
            plan.keep[key] = list(range(0, g.size, 2)) if g.size > 2 else [1]
    heads = next(k for k, g in by_key.items() if g.kind == "head" and g.prunable)
    result = prune(gm, plan, strategy_macs=False)
    with torch.no_grad():
        scale = gm(x).abs().max().item()
        assert_close(result.module(x), masked_reference(gm, plan)(x), scale)
        assert result.module(torch.randn(5, 3, 4, 4)).shape == (5, 5)
    assert count_params(result.module) == expected_params(gm, plan)
    code = result.module.code
    assert f", 3, {len(plan.keep[heads])}, 8)" in code  # the literal head count in the qkv reshape
    gn = result.module.get_submodule("gn")
    assert gn.num_channels < 16 and gn.num_channels == 4 * gn.num_groups  # whole norm groups removed
    assert export_onnx(result.module, x, tmp_path / "ops.onnx").max_abs_diff <= 1e-4 * max(1.0, scale)


def test_unrewritten_size_argument_fails_closed(monkeypatch):
    """The shape check is the safety net: an op whose size arguments prune does not rewrite (simulated
    by switching the reshape rule off) raises PassError naming the node and op; the input is untouched."""
    from zoocompiler.passes.rewrite import prune_args

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    gm = trace(ArgOps().eval(), x)
    heads = next(k for k, g in groups_by_key(gm).items() if g.kind == "head" and g.prunable)
    snap = state_snapshot(gm)
    monkeypatch.setattr(prune_args.ArgRewriter, "_sizes", lambda self, n, op: None)
    with pytest.raises(PassError, match=r"at node reshape\w* \((reshape|view)\)"):
        prune(gm, Plan(keep={heads: [0]}))
    assert_unchanged(gm, snap)


def test_group_scope_keeps_the_same_units_in_every_producer():
    _, x, base = traced("tv_resnet18")
    gm = randomized(base)
    by_key = groups_by_key(gm)
    plan = plan_by_importance(gm, 0.5, importance="l1", scope="group")
    assert not plan.producer_keep and plan.meta["scope"] == "group"
    assert all(len(keep) == by_key[key].size // 2 for key, keep in plan.keep.items())
    result = prune(gm, plan, strategy_macs=False)
    producer_plan = plan_by_importance(gm, 0.5, importance="l1")
    assert result.report.macs_after < prune(gm, producer_plan, strategy_macs=False).report.macs_after
    with torch.no_grad():
        scale = gm(x).abs().max().item()
        assert_close(result.module(x), masked_reference(gm, plan)(x), scale)
    with pytest.raises(PassError, match="scope"):
        plan_by_importance(gm, 0.5, scope="layer")
