"""fuse: equal to the unfused graph on real architectures and on random chains, exact fold rules, export."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
from helpers.architectures import ARCH_BY_ID, ARCH_IDS, fresh_model
from helpers.random_models import build_random_net, random_net_specs
from hypothesis import given, settings
from hypothesis import strategies as st

from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.rewrite.fuse import fuse, fuse_report

REQUIRED = ["tv_resnet18", "tv_mobilenet_v3_small", "tv_efficientnet_b0", "tv_convnext_tiny", "timm_resnet18",
            "timm_vit_tiny"]


def assert_equal_outputs(reference: torch.Tensor, fused: torch.Tensor, atol: float = 1e-5) -> None:
    scale = max(1.0, float(reference.abs().max()))
    assert float((reference - fused).abs().max()) <= atol * scale


def module_types(gm: torch.fx.GraphModule) -> list[str]:
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


@torch.no_grad()
def randomize_affine_state(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affines and layer scales, so folding them changes the weights for real."""
    gen = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            fill(module.running_mean, -0.5, 0.5)
            fill(module.running_var, 0.5, 1.5)
            if module.weight is not None:
                fill(module.weight, 0.5, 1.5)
                fill(module.bias, -0.2, 0.2)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("gamma", "layer_scale"):
            fill(p, 0.5, 1.5)
    return model.eval()


def traced_random(arch_id: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    case = ARCH_BY_ID[arch_id]
    model = randomize_affine_state(fresh_model(arch_id))  # seed 0, load_model(case.spec), a private copy
    x = torch.randn(2, *case.input_shape)
    return trace(model, x), x


@functools.lru_cache(maxsize=2)
def check_architecture(arch_id: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, torch.Tensor]:
    """Trace, fuse and check one architecture (cached: the export test reuses the fused graph)."""
    gm, x = traced_random(arch_id)
    before_state = {k: v.clone() for k, v in gm.state_dict().items()}
    before_nodes = len(gm.graph.nodes)
    fused = fuse(gm, analyze=arch_id == "tv_resnet18")
    with torch.no_grad():
        reference = gm(x)
        assert_equal_outputs(reference, fused(x))
        other = torch.randn(3, *x.shape[1:])
        assert_equal_outputs(gm(other), fused(other))
    report = fuse_report(gm, fused)
    assert report.nodes_after < report.nodes_before
    assert report.params_after <= report.params_before
    assert len(gm.graph.nodes) == before_nodes  # input untouched
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before_state.items())
    types = module_types(fused)
    assert not {"Identity", "Dropout"} & set(types)
    return gm, fused, x


@pytest.mark.parametrize("arch_id", REQUIRED)
def test_fused_equals_unfused_on_real_architectures(arch_id):
    gm, fused, _ = check_architecture(arch_id)
    report = fuse_report(gm, fused)
    if arch_id.endswith("resnet18"):
        assert report.batchnorms_folded == 20 and "BatchNorm2d" not in module_types(fused)
        assert report.params_before - report.params_after == sum(
            m.weight.numel() for m in gm.modules() if isinstance(m, nn.BatchNorm2d)
        )  # BN weight+bias (2C) replaced by a conv bias (C)
    if arch_id == "tv_convnext_tiny":
        assert report.affines_folded == 18  # one layer scale per CNBlock, folded across the permute
    if arch_id == "timm_vit_tiny":
        assert report.identities_removed > 0 and report.nodes_after < report.nodes_before
    if arch_id == "tv_resnet18":  # fused with analyze=True: re-annotated, cut points and costs present
        kept = {n.name for n in fused.graph.nodes}
        assert graph_info(fused).cut_points == [c for c in graph_info(gm).cut_points if c in kept]
        assert len(graph_info(fused).cut_points) < len(graph_info(gm).cut_points)  # the stem BN's cut is gone


@pytest.mark.slow
@pytest.mark.parametrize("arch_id", [a for a in ARCH_IDS if a not in REQUIRED])
def test_fused_equals_unfused_on_the_core_matrix(arch_id):
    check_architecture(arch_id)


def test_fused_model_exports_with_parity(tmp_path):
    _, fused, x = check_architecture("tv_resnet18")
    report = export_onnx(fused, x, tmp_path / "fused.onnx")
    assert report.max_abs_diff <= report.tolerance and report.rel_diff <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("arch_id", ["tv_convnext_tiny", "timm_vit_tiny", "tv_efficientnet_b0"])
def test_more_fused_models_export_with_parity(tmp_path, arch_id):
    _, fused, x = check_architecture(arch_id)
    report = export_onnx(fused, x, tmp_path / "fused.onnx")
    assert report.rel_diff <= 1e-4


# --- exact fold rules ----------------------------------------------------------------------------------


def fused_pair(first: nn.Module, second: nn.Module, shape=(2, 4, 8, 8)) -> tuple[list[str], nn.Module]:
    model = nn.Sequential(first, second).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(*shape)
    gm = trace(model, x)
    fused = fuse(gm, analyze=False)
    with torch.no_grad():
        assert_equal_outputs(model(x), fused(x))
    return module_types(fused), fused


@pytest.mark.parametrize(
    "first,second,folds",
    [
        (nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 5, 1), True),  # k×k then 1×1: always exact
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"), nn.Conv2d(6, 5, 1), True),
        (nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 3, padding=1), False),  # padding would see the 1×1's bias
        (nn.Conv2d(4, 6, 1, bias=False), nn.Conv2d(6, 5, 3, padding=1), True),
        (nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 3, padding=0), True),
        (nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 3, padding=1, padding_mode="replicate"), True),
        (nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 3, stride=2, padding=0), True),
        (nn.Conv2d(4, 6, 1, stride=2), nn.Conv2d(6, 5, 3, padding=0), False),  # strided 1×1 is not pointwise
        (nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 5, 1), False),  # grouped producer
        (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 64, 1), False),  # fused would cost more MACs
        (nn.Conv2d(4, 64, 3, padding=1), nn.Conv2d(64, 4, 1), True),
        (nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 1, padding=1), False),  # padded 1×1 emits its bias at the border
    ],
    ids=[
        "kxk_1x1",
        "strided_reflect_1x1",
        "1x1bias_padded",
        "1x1nobias_padded",
        "1x1bias_unpadded",
        "1x1bias_replicate",
        "1x1bias_strided_consumer",
        "strided_1x1_producer",
        "grouped",
        "expanding",
        "bottleneck",
        "padded_1x1_consumer",
    ],
)
def test_conv_pair_folds_only_when_exact_and_cheaper(first, second, folds):
    types, _ = fused_pair(first, second)
    assert types.count("Conv2d") == (1 if folds else 2)


def test_linear_pairs_and_batchnorm_rules():
    types, _ = fused_pair(nn.Linear(8, 6), nn.Linear(6, 5), shape=(3, 8))
    assert types == ["Linear"]
    types, _ = fused_pair(nn.Linear(8, 6), nn.BatchNorm1d(6), shape=(3, 8))
    assert types == ["Linear"]
    # BatchNorm1d on B×N×D normalises N, not the linear's features: must stay
    types, _ = fused_pair(nn.Linear(8, 6), nn.BatchNorm1d(5), shape=(3, 5, 8))
    assert types == ["Linear", "BatchNorm1d"]
    types, _ = fused_pair(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6))
    assert types == ["Conv2d"]


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class LayerScaleAcrossPermute(nn.Module):
    """ConvNeXt-style: channels-last linear, permute back, per-channel scale and shift."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.beta = nn.Parameter(torch.randn(1, 6, 1, 1))

    def forward(self, x):
        y = self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return (y.mul(self.gamma.reshape(1, -1, 1, 1)) - self.beta) / 2.0


class SpatialScale(nn.Module):
    """A scale that varies over positions is not a channel affine: must stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.scale = nn.Parameter(torch.rand(1, 1, 8, 8))

    def forward(self, x):
        return self.conv(x) * self.scale


def _fuse_module(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    model = randomize_affine_state(model)
    gm = trace(model, x)
    fused = fuse(gm, analyze=False)
    with torch.no_grad():
        assert_equal_outputs(model(x), fused(x))
    return fused


def test_bn_after_a_conv_with_two_users_is_not_folded():
    fused = _fuse_module(TwoUsers(), torch.randn(2, 4, 6, 6))
    assert module_types(fused) == ["Conv2d", "BatchNorm2d"]


def test_channel_affines_fold_across_permutes():
    model = LayerScaleAcrossPermute()
    fused = _fuse_module(model, torch.randn(2, 4, 5, 5))
    assert graph_info(fused).extra["fuse"]["affines_folded"] == 3
    ops = [n.target for n in fused.graph.nodes if n.op in ("call_function", "call_method")]
    assert ops == ["permute", "permute"]
    assert not hasattr(fused, "gamma") and not hasattr(fused, "beta")  # folded constants are dropped


def test_spatially_varying_scale_is_kept():
    fused = _fuse_module(SpatialScale(), torch.randn(2, 4, 8, 8))
    assert graph_info(fused).extra["fuse"]["affines_folded"] == 0
    assert len(fused.graph.nodes) == 5  # x, conv, scale, mul, output


def test_timm_batchnorm_act_keeps_its_activation():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU))
    fused = _fuse_module(model, torch.randn(2, 3, 6, 6))
    assert module_types(fused) == ["Conv2d", "ReLU"]


class ShapeBranch(nn.Module):
    """Python control flow on a shape: fx tracing fails, the torch.export fallback gives an ATen graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.shape[-1] > 8:
            y = nn.functional.avg_pool2d(y, 2)
        return y


def test_export_fallback_graph_is_returned_unchanged_with_a_note():
    gm = trace(ShapeBranch().eval(), torch.randn(2, 3, 16, 16))
    assert graph_info(gm).tracer == "export"
    fused = fuse(gm)
    report = fuse_report(gm, fused)
    assert report.nodes_after == report.nodes_before and "unchanged" in report.note


# --- random graphs -------------------------------------------------------------------------------------


class Affine(nn.Module):
    """``x * scale + shift`` with per-channel (or scalar) constants; traced to mul/add on get_attr nodes."""

    def __init__(self, c: int, rank: int, mode: str):
        super().__init__()
        shape = (c,) if rank == 2 else (c, 1, 1)
        self.mode = mode
        self.scale = nn.Parameter(torch.rand(shape) + 0.5)
        self.shift = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        if self.mode == "scalar":
            return x * 0.5 + 0.25
        if self.mode == "scale":
            return x * self.scale
        if self.mode == "shift":
            return x + self.shift
        return x * self.scale + self.shift


def _build(ops: list[tuple], c: int, rank: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for op in ops:
        kind = op[0]
        if kind == "conv":
            _, out, k, pad, stride, bias, groups, mode = op
            layers.append(nn.Conv2d(c, out, k, stride=stride, padding=pad, bias=bias, groups=groups, padding_mode=mode))
            c = out
        elif kind == "linear":
            _, out, bias = op
            layers.append(nn.Linear(c, out, bias=bias))
            c = out
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c) if rank == 4 else nn.BatchNorm1d(c))
        elif kind == "affine":
            layers.append(Affine(c, rank, op[1]))
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "dropout":
            layers.append(nn.Dropout(0.3))
        else:
            layers.append(nn.Identity())
    return nn.Sequential(*layers)


@st.composite
def conv_chains(draw):
    size, ops = 8, []  # channel counts stay in {4, 8, 12}, so groups 1, 2, 4 always divide
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["conv", "conv", "conv", "bn", "affine", "relu", "dropout", "identity"]))
        if kind == "conv":
            k = draw(st.sampled_from([1, 1, 3]))
            pad = draw(st.sampled_from([0, 1])) if k == 3 else draw(st.sampled_from([0, 0, 0, 1]))
            stride = draw(st.sampled_from([1, 1, 2])) if size >= 6 else 1
            if size + 2 * pad - k + 1 < 2:
                pad = 1
            out = draw(st.sampled_from([4, 8, 12]))
            groups = draw(st.sampled_from([1, 1, 2, 4]))
            mode = draw(st.sampled_from(["zeros", "zeros", "reflect"])) if pad else "zeros"
            ops.append(("conv", out, k, pad, stride, draw(st.booleans()), groups, mode))
            size = (size + 2 * pad - k) // stride + 1
        elif kind == "affine":
            ops.append(("affine", draw(st.sampled_from(["scale", "shift", "both", "scalar"]))))
        else:
            ops.append((kind,))
    return ops


@st.composite
def linear_chains(draw):
    ops = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["linear", "linear", "bn", "affine", "relu", "dropout", "identity"]))
        if kind == "linear":
            ops.append(("linear", draw(st.sampled_from([3, 6, 12])), draw(st.booleans())))
        elif kind == "affine":
            ops.append(("affine", draw(st.sampled_from(["scale", "shift", "both", "scalar"]))))
        else:
            ops.append((kind,))
    return ops


def expected_remaining_norm_and_affine_nodes(ops: list[tuple]) -> tuple[int, int]:
    """Oracle: a BN / affine folds iff the previous op (skipping identities) is a producer or a folded BN/affine."""
    bn_left = affine_nodes_left = 0
    previous_folds = False  # "the value here is a conv/linear output (possibly already scaled)"
    for op in ops:
        kind = op[0]
        if kind in ("identity", "dropout"):
            continue
        if kind in ("conv", "linear"):
            previous_folds = True
        elif kind == "bn":
            bn_left += not previous_folds
        elif kind == "affine":
            affine_nodes_left += 0 if previous_folds else (2 if op[1] in ("both", "scalar") else 1)
        else:
            previous_folds = False
    return bn_left, affine_nodes_left


def _check_chain(ops: list[tuple], x: torch.Tensor, rank: int) -> None:
    torch.manual_seed(0)
    model = randomize_affine_state(_build(ops, x.shape[1], rank))
    gm = trace(model, x, analyze=False)
    fused = fuse(gm, analyze=False)
    with torch.no_grad():
        assert_equal_outputs(model(x), fused(x))
    report = fuse_report(gm, fused)
    assert report.nodes_after <= report.nodes_before
    types = module_types(fused)
    bn_left, affine_left = expected_remaining_norm_and_affine_nodes(ops)
    assert sum(t.startswith("BatchNorm") for t in types) == bn_left
    assert sum(1 for n in fused.graph.nodes if n.op == "call_function") == affine_left
    assert not {"Identity", "Dropout"} & set(types)
    producers = sum(op[0] in ("conv", "linear") for op in ops)
    assert sum(t in ("Conv2d", "Linear") for t in types) <= producers


@settings(max_examples=60)
@given(conv_chains())
def test_random_conv_chains_fuse_exactly(ops):
    _check_chain(ops, torch.randn(2, 4, 8, 8), rank=4)


@settings(max_examples=40)
@given(linear_chains())
def test_random_linear_chains_fuse_exactly(ops):
    _check_chain(ops, torch.randn(3, 4), rank=2)


@settings(max_examples=20)
@given(random_net_specs(max_blocks=4))
def test_random_networks_fuse_exactly(spec):
    kwargs, shape = spec
    net = build_random_net(kwargs)
    x = torch.randn(2, *shape)
    gm = trace(net, x, analyze=False)
    fused = fuse(gm, analyze=False)
    with torch.no_grad():
        assert_equal_outputs(net(x), fused(x))
    assert fuse_report(gm, fused).nodes_after < len(gm.graph.nodes)  # the stem's BN always folds
    assert copy.deepcopy(fused)(x).shape == net(x).shape
