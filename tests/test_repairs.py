"""The Slice-and-Pack repair pass (passes/rewrite/repairs.py, paper 000 "Slicing the Network").

* a fused fragment equals the unfused repaired network (the :class:`SliceNet` with every layer on, at the
  fragment's features) to ≤ 1e-5, with no repair layer left, on the pack source zoo, the architecture
  matrix and generated graphs;
* with every layer off, the SliceNet is the original model's features (the classifier's input), exactly;
* ``Repair.fit`` recovers an exact linear stand-in of the dropped units and reduces the error of a noisy one;
* the bias rule (no bias in front of a zero-padded conv), the zeroed layers, and the prune plan of a cut;
* a model whose output is not a linear classifier is a ``PassError``.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from helpers.architectures import ARCH_IDS, traced
from helpers.pruning import assert_close, randomized
from helpers.random_models import build_random_net, random_net_specs
from helpers.reached import at_least, reached
from hypothesis import given, settings
from hypothesis import strategies as st

from zoocompiler.core.errors import PassError
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.plans import group_keys, producers
from zoocompiler.passes.rewrite.mask_generators import gate_points
from zoocompiler.passes.rewrite.repairs import (
    Fragment,
    Repair,
    RepairSite,
    SliceNet,
    cut_fragment,
    slice_layers,
    slice_net,
)
from zoocompiler.sources import load_model
from zoocompiler.zoo import build_model

PACK_SOURCES = ("vgg_s_0to3", "resnet_s_4to6", "convnext_t_7to9")
# matrix cases whose fragment takes several seconds to cut (big graphs: every pass re-analyses them)
SLOW_ARCHS = {"tv_resnet50", "tv_densenet121", "tv_efficientnet_b0", "tv_vit_b_16", "tv_swin_t", "tv_convnext_tiny",
              "timm_deit_tiny"}  # deit: timm_vit_tiny's architecture
MATRIX = [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_ARCHS else a for a in ARCH_IDS]
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


# ----------------------------------------------------------------------------- helpers


def _nontrivial(gm: fx.GraphModule, seed: int = 1) -> fx.GraphModule:
    """A copy of ``gm`` with random norm statistics and affine parameters (and no near-zero parameters)."""
    gm = randomized(gm, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return gm


@functools.cache
def _pack_source(name: str) -> tuple[fx.GraphModule, torch.Tensor]:
    """A pack source zoo model (random weights, eval mode, non-trivial norms) traced, and a small input."""
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    return _nontrivial(trace(build_model(name).eval(), x[:2])), x


def _select(net: SliceNet, seed: int, fraction: float = 0.5) -> list[list[int]]:
    """Keep a random ``fraction`` of every layer's units; random repair weights (and biases where allowed)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    kept = []
    with torch.no_grad():
        for i, layer in enumerate(net.layers.layers):
            k = sorted(rng.choice(layer.units, size=max(1, int(layer.units * fraction)), replace=False).tolist())
            net.set_keep(i, k)
            kept.append(k)
            repair = net.repair(i)
            if repair is not None:
                repair.weight.copy_(torch.randn(repair.weight.shape, generator=g) / len(k) ** 0.5)
                if repair.bias is not None:
                    repair.bias.copy_(torch.randn(repair.bias.shape, generator=g) * 0.5)
    return kept


def _cut_and_compare(gm: fx.GraphModule, x: torch.Tensor, seed: int = 0) -> tuple[Fragment, SliceNet, list]:
    """With a random selection and repairs: the SliceNet with every layer off is the original's features
    (exactly), and the cut fragment equals it with every layer on, at the fragment's features; every repair
    is folded into its site."""
    net = slice_net(gm).eval()
    kept = _select(net, seed)
    net.set_on([])
    with torch.no_grad():
        assert torch.equal(net(x), _classifier_input(gm, x))
    net.set_on(range(len(net.layers.layers)))
    frag = cut_fragment(gm, net)
    with torch.no_grad():
        want = net(x).index_select(frag.dim, torch.tensor(frag.features))
        got = frag.module(x)
    assert got.shape == want.shape
    assert_close(got, want, float(want.abs().max()))
    assert frag.repairs_left == 0
    return frag, net, kept


def _classifier_input(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """The input of ``gm``'s last linear op (an ``nn.Linear`` or ``F.linear``) on ``x``, found independently of
    the pass: its value when that op runs (later in-place ops cannot change it)."""

    def linear(n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(gm.get_submodule(n.target), nn.Linear)
        return n.op == "call_function" and n.target is F.linear

    last = [n for n in gm.graph.nodes if linear(n)][-1]
    seen: list[torch.Tensor] = []

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            if n is last:
                seen.append(self.env[n.args[0]].clone())
            return super().run_node(n)

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen[0]


def _repair(units: int, kept: list[int], bias: bool, dim: int = 1) -> Repair:
    r = Repair(units, dim, bias)
    r.keep.zero_()
    r.keep[kept] = 1.0
    return r


def _linear_units(kept_values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dim: int) -> torch.Tensor:
    """``weight @ kept + bias`` along ``dim`` of ``kept_values``."""
    moved = torch.movedim(kept_values, dim, -1) @ weight.T + bias
    return torch.movedim(moved, -1, dim)


def _synthetic(units: int, kept: list[int], dim: int, shape: tuple[int, ...], noise: float, bias: bool, seed: int):
    """A value of ``shape`` (its size at ``dim`` replaced by ``units``) whose dropped units are a linear map
    (+ bias) of its kept ones (+ noise); returns (value, map [dropped, kept], bias [dropped])."""
    g = torch.Generator().manual_seed(seed)
    dropped = [u for u in range(units) if u not in kept]
    full = list(shape)
    full[dim] = units
    v = torch.zeros(full)
    ks = list(full)
    ks[dim] = len(kept)
    base = torch.randn(ks, generator=g)
    w = torch.randn(len(dropped), len(kept), generator=g)
    b = torch.randn(len(dropped), generator=g) if bias else torch.zeros(len(dropped))
    out = _linear_units(base, w, b, dim)
    out = out + noise * torch.randn(out.shape, generator=g)
    v.index_copy_(dim, torch.tensor(kept), base)
    v.index_copy_(dim, torch.tensor(dropped), out)
    return v, w, b


def _dropped_error(r: Repair, v: torch.Tensor, dropped: list[int]) -> float:
    r.on = True
    with torch.no_grad():
        diff = (r(v) - v).index_select(r.dim, torch.tensor(dropped))
    return float(diff.double().pow(2).sum())


# ----------------------------------------------------------------------------- fragment == repaired net


@pytest.mark.parametrize("name", PACK_SOURCES)
def test_off_net_is_the_original_and_fused_fragment_is_the_repaired_net_on_the_pack_sources(name):
    gm, x = _pack_source(name)
    layers = slice_layers(gm)
    assert any(layer.repaired for layer in layers.layers)  # the claim is about repairs: there must be some
    frag, _, _ = _cut_and_compare(gm, x)
    assert frag.dim == 1 and len(frag.features) > 0


@pytest.mark.parametrize("arch", MATRIX)
def test_off_net_is_the_original_and_fused_fragment_is_the_repaired_net_on_the_matrix(arch):
    _, x, shared = traced(arch)
    layers = slice_layers(shared)  # every matrix case ends in a linear classifier: no PassError (others: below)
    assert any(layer.repaired for layer in layers.layers)
    _cut_and_compare(_nontrivial(shared), x)


@at_least(20)
@settings(max_examples=25, deadline=None)
@given(spec=random_net_specs(max_blocks=4), seed=st.integers(0, 10_000))
def test_off_net_is_the_original_and_fused_fragment_is_the_repaired_net_on_generated_graphs(spec, seed):
    kwargs, shape = spec
    model = build_random_net(kwargs, seed=seed)  # its head is an nn.Linear: a classifier the pass accepts
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(seed))
    gm = trace(model, x[:2])
    try:
        gate_points(gm)
    except PassError:  # every group pinned (e.g. a flatten head over split channels): nothing to slice
        with pytest.raises(PassError, match="no prunable"):
            slice_layers(gm)
        return
    _cut_and_compare(_nontrivial(gm, seed), x, seed)
    reached()


class _ConvAndPermutedLinear(nn.Module):
    """One group read by a conv (units on dim 1) and by a linear on a permuted view (units on dim 3)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.lin, self.fc = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.c1(x))
        return self.fc((self.c2(y) + self.lin(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)).mean((2, 3)))


@pytest.mark.parametrize("size", [6, 8])  # 8: H == C, where a repair on the wrong dim would run silently
def test_sites_on_different_unit_dims_stay_exact(size):
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    gm = _nontrivial(trace(_ConvAndPermutedLinear().eval(), x[:2]))
    _cut_and_compare(gm, x)


class _ConvBeforeRepair(nn.Module):
    """conv → 1×1 conv → (nothing) → zero-padded 3×3 conv: the 1×1 conv's repair has no bias (padded site)."""

    def __init__(self):
        super().__init__()
        self.c0, self.pw = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(self.pw(F.relu(self.c0(x))))).mean((2, 3)))


def test_a_repair_behind_a_conv_folds_into_its_padded_site():
    """cut_fragment folds each repair into its site first (fuse.fold_into): fuse's graph-order sweep would
    fold pw (biased) into pw's repair, which could then no longer fold into the zero-padded c2."""
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    gm = trace(_ConvBeforeRepair().eval(), x[:2])
    frag, net, kept = _cut_and_compare(gm, x)
    assert not net.layers.layers[1].bias
    assert frag.module.get_submodule("c2").in_channels == len(kept[1])  # c2 reads only pw's kept units
    assert frag.repairs_left == 0


# ----------------------------------------------------------------------------- SliceNet switches


def test_gates_repairs_and_captures_of_the_slice_net():
    gm, x = _pack_source("vgg_s_0to3")
    net = slice_net(gm).eval()
    layers = net.layers.layers
    for i, layer in enumerate(layers):
        assert (net.repair(i) is None) == (net.gate(i) is not None) == (not layer.repaired)
    original = _classifier_input(gm, x)
    last = len(layers) - 1  # classifier.1: zeroed, its units are the features
    kept = list(range(0, layers[last].units, 3))
    net.set_keep(last, kept)
    assert net.kept(last) == kept
    net.set_on([last])
    capture = net.capture(last)
    capture.on = True
    with torch.no_grad():
        out = net(x)
    dropped = torch.tensor([u for u in range(layers[last].units) if u not in kept])
    assert torch.equal(out.index_select(1, torch.tensor(kept)), original.index_select(1, torch.tensor(kept)))
    assert not out.index_select(1, dropped).any()  # the gate zeroes the dropped units
    assert capture.value is not None and capture.value.shape[layers[last].point.dim] == layers[last].units
    assert not capture.value.index_select(1, dropped).any()  # Z_i: the layer's (gated) outputs
    capture.on, capture.value = False, None
    with torch.no_grad():
        net(x)
    assert capture.value is None


def test_a_repair_keeping_every_unit_is_the_identity():
    gm, x = _pack_source("vgg_s_0to3")
    net = slice_net(gm).eval()
    with torch.no_grad():
        net.repair(0).weight.normal_()  # reads kept units only and writes dropped ones only: none here
    net.set_on([0])
    p, b = net.repair(0).matrix()
    assert torch.equal(p, torch.eye(p.shape[0])) and b is None
    with torch.no_grad():
        want = _classifier_input(gm, x)
        assert_close(net(x), want, float(want.abs().max()))


# ----------------------------------------------------------------------------- Repair.fit


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("dim", "shape"), [(1, (16, 0, 5, 5)), (2, (16, 9, 0))])  # conv maps; linear tokens
def test_fit_recovers_an_exact_linear_repair(bias, dim, shape):
    units, kept = 10, [0, 2, 3, 7, 9]
    dropped = [u for u in range(units) if u not in kept]
    v, w, b = _synthetic(units, kept, dim, shape, noise=0.0, bias=bias, seed=1)
    r = _repair(units, kept, bias, dim)
    assert r.fit(r.rows(v), ridge=0.0) < 1e-6
    assert r.fit(r.rows(v)) < 1e-5  # the default ridge (1e-3 of the mean diagonal) barely moves an exact fit
    r.fit(r.rows(v), ridge=0.0)
    p, pb = r.matrix()
    with torch.no_grad():
        assert torch.equal(p[kept], torch.eye(units)[kept])  # kept units pass unchanged
        assert not p[dropped][:, dropped].any()  # dropped units are read by nothing
        assert torch.allclose(p[dropped][:, kept], w, atol=1e-4)
        if bias:
            assert not pb[kept].any() and torch.allclose(pb[dropped], b, atol=1e-4)
        else:
            assert pb is None and r.bias is None
    assert _dropped_error(r, v, dropped) < 1e-6 * float(v.pow(2).sum())


def test_fit_without_a_bias_cannot_recover_an_offset():
    units, kept = 8, [1, 4, 5]
    v, _, _ = _synthetic(units, kept, 1, (16, 0, 4, 4), noise=0.0, bias=True, seed=2)
    with_bias, without = _repair(units, kept, True), _repair(units, kept, False)
    assert with_bias.fit(with_bias.rows(v), ridge=0.0) < 1e-6
    assert without.fit(without.rows(v), ridge=0.0) > 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_fit_on_noisy_units_reduces_the_error_of_a_zero_repair(bias):
    units, kept = 12, [0, 1, 5, 6, 8, 11]
    dropped = [u for u in range(units) if u not in kept]
    v, _, _ = _synthetic(units, kept, 1, (8, 0, 6, 6), noise=0.5, bias=bias, seed=3)
    zero = _repair(units, kept, bias)
    fitted = _repair(units, kept, bias)
    residual = fitted.fit(fitted.rows(v))
    zero_error, fitted_error = _dropped_error(zero, v, dropped), _dropped_error(fitted, v, dropped)
    assert residual > 1e-3
    assert fitted_error < 0.5 * zero_error
    energy = float(v.index_select(1, torch.tensor(dropped)).double().pow(2).sum())
    assert zero_error == pytest.approx(energy, rel=1e-5)  # a zero repair predicts 0 for every dropped unit
    assert residual == pytest.approx(fitted_error / energy, rel=1e-3)  # the residual is the relative error


def test_fit_with_nothing_dropped_is_zero_and_keeps_the_identity():
    r = _repair(5, list(range(5)), True)
    assert r.fit(r.rows(torch.randn(4, 5, 3, 3))) == 0.0
    p, b = r.matrix()
    assert torch.equal(p, torch.eye(5)) and not b.any()


# ----------------------------------------------------------------------------- layers: repaired or zeroed


def _by_producer(gm) -> dict:
    return {layer.point.producer: layer for layer in slice_layers(gm).layers}


def test_bias_rule_and_zeroed_features_on_vgg():
    gm, _ = _pack_source("vgg_s_0to3")
    layers = slice_layers(gm)
    assert layers.features == "classifier_2"  # the ReLU feeding classifier.3
    by = _by_producer(gm)
    first, last_conv, hidden = by["features.0.weight"], by["features.11.weight"], by["classifier.1.weight"]
    assert first.sites == (RepairSite("features_4", "features_3", 1, False),)
    assert gm.get_submodule("features.4").padding == (1, 1) and not first.bias  # a padded conv would see a bias
    assert last_conv.sites == (RepairSite("classifier_1", "classifier_0", 1, True),) and last_conv.bias
    assert not hidden.repaired and not hidden.bias and "fragment's features" in hidden.zeroed
    net = slice_net(gm, layers)
    i_first, i_last = (list(by).index(k) for k in ("features.0.weight", "features.11.weight"))
    assert net.repair(i_first).bias is None and net.repair(i_last).bias is not None
    assert net.gate(list(by).index("classifier.1.weight")) is not None


def test_a_site_reading_two_ways_gets_no_bias_and_residual_groups_are_zeroed():
    gm, _ = _pack_source("resnet_s_4to6")
    by = _by_producer(gm)
    stem = by["conv1.weight"]
    assert {s.consumer for s in stem.sites} == {"layer1_0_conv1", "layer1_0_downsample_0"}
    assert gm.get_submodule("layer1.0.downsample.0").padding == (0, 0)  # unpadded, but its sibling is padded:
    assert not stem.bias
    residual = [layer for layer in by.values() if not layer.repaired]
    assert residual and all("residual group" in layer.zeroed for layer in residual)


class _UnpaddedSites(nn.Module):
    """conv3x3 → 1×1 conv → valid 3×3 conv → pool → linear: every repair site is unpadded."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 16, 3)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.fc(F.relu(self.c3(y)).mean((2, 3)))


def test_unpadded_conv_sites_allow_a_bias_that_fuses_exactly():
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = _nontrivial(trace(_UnpaddedSites().eval(), x[:2]))
    by = _by_producer(gm)
    assert by["c1.weight"].bias and by["c2.weight"].bias
    assert by["c1.weight"].sites == (RepairSite("c2", "relu", 1, False),)
    assert not by["c3.weight"].repaired and "features" in by["c3.weight"].zeroed
    frag, net, _ = _cut_and_compare(gm, x)
    assert all(net.repair(i).bias is not None and net.repair(i).bias.any() for i in (0, 1))


class _ConvHead(nn.Module):
    """A SqueezeNet-style head: 1×1 conv to the classes, then pool (no linear classifier)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x))).mean((2, 3))


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.fa, self.fb = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        f = F.relu(self.c1(x)).mean((2, 3))
        return self.fa(f) + self.fb(f)


@pytest.mark.parametrize("model", [_ConvHead, _TwoHeads, "torchvision:squeezenet1_1"])
def test_a_model_without_a_linear_classifier_is_a_pass_error(model):
    net = load_model(model) if isinstance(model, str) else model().eval()
    gm = trace(net, torch.randn(2, 3, 32, 32))
    with pytest.raises(PassError, match="not a linear classifier"):
        slice_layers(gm)


def test_a_model_without_prunable_layers_is_a_pass_error():
    gm = trace(nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval(), torch.randn(2, 3, 4, 4))
    with pytest.raises(PassError, match="no prunable"):
        slice_layers(gm)


# ----------------------------------------------------------------------------- the plan of a cut


def _residual_keys(gm) -> set[str]:
    """The keys of ``gm``'s multi-producer (residual) groups."""
    keys = group_keys(gm)
    return {keys[g.gid] for g in graph_info(gm).unit_groups if len(producers(g)) > 1}


@pytest.mark.parametrize("name", ["vgg_s_0to3", "resnet_s_4to6"])
def test_plan_keeps_exactly_the_selected_units_per_producer(name):
    gm, x = _pack_source(name)
    frag, net, kept = _cut_and_compare(gm, x, seed=5)
    plan = frag.plan
    assert plan.meta["source"] == "pack"
    layers, residual = net.layers.layers, _residual_keys(gm)
    assert bool(residual) == (name == "resnet_s_4to6")
    for layer, k in zip(layers, kept, strict=True):
        p = layer.point
        if p.group in residual:  # pad: each producer computes exactly its own units
            assert plan.producer_keep[p.group][p.producer] == k
            assert plan.strategies[p.group] == "pad"
        else:
            assert plan.keep[p.group] == k and p.group not in plan.producer_keep
    repair_keys = [key for key in plan.keep if key.startswith("zc_repair_")]
    assert len(repair_keys) == sum(len(layer.sites) for layer in layers)
    for key in repair_keys:  # a repair layer's output (the site's input) keeps every unit
        i = int(key.removeprefix("zc_repair_").split("_")[0])
        assert plan.keep[key] == list(range(layers[i].units))
    expected = set(plan.keep) - set(repair_keys) | set(plan.producer_keep)
    assert expected == {layer.point.group for layer in layers}  # nothing else is pruned


def test_fragment_sites_read_only_the_kept_units_and_features_are_the_kept_ones():
    gm, x = _pack_source("vgg_s_0to3")
    frag, net, kept = _cut_and_compare(gm, x, seed=6)
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer, k in zip(net.layers.layers, kept, strict=True):
        for site in layer.sites:  # the repair was fused into its site, which now reads the kept units only
            mod = frag.module.get_submodule(nodes[site.consumer].target)
            assert (mod.in_features if site.linear else mod.in_channels) == len(k)
    assert frag.features == kept[-1]  # classifier.1 (zeroed) holds the features
    with torch.no_grad():
        assert frag.module(x).shape == (len(x), len(kept[-1]))


def test_residual_features_are_the_union_of_their_producers():
    gm, x = _pack_source("resnet_s_4to6")
    frag, net, kept = _cut_and_compare(gm, x, seed=7)
    layers = net.layers.layers
    features_group = layers[-1].point.group  # layer4's residual stream: conv2 + downsample
    owners = [k for layer, k in zip(layers, kept, strict=True) if layer.point.group == features_group]
    assert len(owners) == 2 and "fragment's features" not in layers[-1].zeroed  # zeroed as a residual group
    assert frag.features == sorted(set(owners[0]) | set(owners[1]))


def test_cutting_leaves_the_model_and_the_net_unchanged():
    gm, x = _pack_source("convnext_t_7to9")
    code, state = gm.code, copy.deepcopy(gm.state_dict())
    net = slice_net(gm).eval()
    _select(net, 9)
    net.set_on(range(len(net.layers.layers)))
    net_state = copy.deepcopy(net.state_dict())
    cut_fragment(gm, net)
    assert gm.code == code and all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    assert all(torch.equal(v, net_state[k]) for k, v in net.state_dict().items())
