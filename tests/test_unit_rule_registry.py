"""The unit-rule registry: a custom leaf module is pinned until ``register_module_rule`` teaches it,
then its groups are prunable and the pruned model equals the masked reference; registrations are
undone (nothing leaks), user rules beat built-in ones, bad registrations are one-line ZooErrors.

The ``ScaledConv`` example and its rule are the ones docs/contributing.md shows ("Add a unit rule").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import zoocompiler as zc
from zoocompiler.core.errors import ZooError
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis.plans import Plan, graph_fingerprint, groups_by_key
from zoocompiler.passes.analysis.unit_rules import conv_units, rule_for_module, unknown
from zoocompiler.passes.rewrite.prune import masked_reference, prune

# ----------------------------------------------------------------------------- the documented example


class ScaledConv(nn.Module):
    """A conv whose output is multiplied by a constant; as a leaf module the built-in rules do not know it."""

    def __init__(self, c_in: int, c_out: int, scale: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale


def scaled_conv_rule(cx, m):
    """Scaling keeps channels apart, so the units are the inner conv's: its input channels are
    consumed (``conv_in``), its output channels are fresh (``conv_out``)."""
    conv = m.conv
    return conv_units(cx, cx.this(), cx.param_name("conv.weight"), cx.param_name("conv.bias"),
                      conv.groups, conv.in_channels, conv.out_channels)


def _traced() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """The model of docs/contributing.md: conv -> ScaledConv (a leaf) -> relu -> conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ScaledConv(8, 12), nn.ReLU(), nn.Conv2d(12, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    return zc.trace(model, x, extra_leaf_modules=(ScaledConv,)), x


def _group_of(gm: torch.fx.GraphModule, param: str):
    """The group holding ``param`` (a bias: only the layer's output units)."""
    return next(g for g in graph_info(gm).unit_groups if any(m.param == param for m in g.members))


@pytest.fixture
def scaled_conv_registered():
    undo = zc.register_module_rule(ScaledConv, scaled_conv_rule)
    yield
    undo()
    assert rule_for_module(ScaledConv) is None


# ----------------------------------------------------------------------------- tests


def test_unknown_leaf_module_pins_its_groups_with_a_reason():
    assert rule_for_module(ScaledConv) is None
    gm, _ = _traced()
    stem = _group_of(gm, "0.bias")
    assert stem.pinned and "unknown module ScaledConv at node _1" in stem.reasons
    assert not any(m.param and m.param.startswith("1.") for g in graph_info(gm).unit_groups for m in g.members)


def test_registered_rule_makes_the_groups_prunable_and_pruned_equals_masked(scaled_conv_registered):
    gm, x = _traced()
    stem, inner = _group_of(gm, "0.bias"), _group_of(gm, "1.conv.bias")
    assert stem.prunable and inner.prunable and (stem.size, inner.size) == (8, 12)
    roles = {(m.param, m.role) for m in stem.members + inner.members if m.param}
    assert {("1.conv.weight", "conv_in"), ("1.conv.weight", "conv_out"), ("3.weight", "conv_in")} <= roles

    plan = Plan(meta={"fingerprint": graph_fingerprint(gm)})
    for key, g in groups_by_key(gm).items():
        if g.prunable and g.size >= 2:
            plan.keep[key] = list(range(0, g.size, 2))
    result = prune(gm, plan, strategy_macs=False)
    assert tuple(result.module.get_submodule("1.conv").weight.shape[:2]) == (6, 4)
    assert result.report.params_after < result.report.params_before
    with torch.no_grad():
        pruned, masked, full = result.module(x), masked_reference(gm, plan)(x), gm(x)
    scale = max(1.0, full.abs().max().item())
    assert (pruned - masked).abs().max().item() <= 1e-5 * scale
    assert (masked - full).abs().max().item() > 1e-3 * scale  # the removed units mattered


def test_subclasses_use_the_rule_and_undo_restores_the_previous_one(scaled_conv_registered):
    class ScaledConvB(ScaledConv):
        pass

    assert rule_for_module(ScaledConvB) is scaled_conv_rule

    def other(cx, m):
        return unknown(cx, "other rule")

    undo = zc.register_module_rule(ScaledConv, other)
    assert rule_for_module(ScaledConv) is other
    undo()
    undo()  # idempotent
    assert rule_for_module(ScaledConv) is scaled_conv_rule


def test_user_rule_beats_the_builtin_one_and_builtin_subclass_semantics_stay():
    def pin_relu(cx, m):
        return unknown(cx, f"custom rule pins {type(m).__name__}")

    class LayerNormOwnForward(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    builtin = rule_for_module(nn.ReLU)
    undo = zc.register_module_rule(nn.ReLU, pin_relu)
    try:
        assert rule_for_module(nn.ReLU) is pin_relu
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
        gm = zc.trace(model, torch.randn(1, 3, 4, 4))
        assert _group_of(gm, "0.bias").reasons == ["custom rule pins ReLU"]
    finally:
        undo()
    assert rule_for_module(nn.ReLU) is builtin
    model = nn.Sequential(nn.Linear(4, 6), LayerNormOwnForward(6), nn.Linear(6, 2)).eval()
    gm = zc.trace(model, torch.randn(2, 4), extra_leaf_modules=(LayerNormOwnForward,))
    assert _group_of(gm, "0.bias").reasons == ["LayerNormOwnForward at node _1 overrides LayerNorm.forward"]


def test_a_failing_rule_fails_closed(scaled_conv_registered):
    def broken(cx, m):
        raise ValueError("boom")

    undo = zc.register_module_rule(ScaledConv, broken)
    try:
        gm, _ = _traced()
    finally:
        undo()
    stem = _group_of(gm, "0.bias")
    assert stem.pinned and any("could not be analysed" in r and "boom" in r for r in stem.reasons)


@pytest.mark.parametrize(
    ("cls", "rule", "match"),
    [
        (ScaledConv, "not a function", "callable rule"),
        (ScaledConv(1, 1), scaled_conv_rule, "nn.Module subclass"),
        (int, scaled_conv_rule, "nn.Module subclass"),
    ],
)
def test_bad_registrations_are_one_line_errors(cls, rule, match):
    with pytest.raises(ZooError, match=match) as err:
        zc.register_module_rule(cls, rule)
    assert "\n" not in str(err.value)
    assert rule_for_module(ScaledConv) is None
