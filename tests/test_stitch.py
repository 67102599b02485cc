"""Stitch layers: shapes and ONNX parity for every interface pair, exact least squares, ridge, zoo accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from zoocompiler.core.errors import InputShapeError, PassError, ZooError
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.ir import Layout, TensorInfo, graph_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.rewrite.blocks import extract_block
from zoocompiler.passes.rewrite.stitch import (
    MapToMap,
    MapToTokens,
    ToFlat,
    TokensToMap,
    TokensToTokens,
    least_squares,
    make_stitch,
    stitch,
    stitch_models,
)


def fmap(c: int, h: int, w: int) -> TensorInfo:
    return TensorInfo((2, c, h, w), "float32", Layout.MAP)


def nhwc(c: int, h: int, w: int) -> TensorInfo:
    return TensorInfo((2, h, w, c), "float32", Layout.MAP_NHWC)


def tokens(d: int, side: int, prefix: int) -> TensorInfo:
    return TensorInfo((2, side * side + prefix, d), "float32", Layout.TOKENS, prefix, (side, side))


def flat(d: int) -> TensorInfo:
    return TensorInfo((2, d), "float32", Layout.FLAT)


# (id, src, dst, expected class, expected resampling module type)
PAIRS = [
    ("map_same", fmap(8, 14, 14), fmap(8, 14, 14), MapToMap, nn.Identity),
    ("map_channels", fmap(8, 7, 7), fmap(16, 7, 7), MapToMap, nn.Identity),
    ("map_down_int", fmap(8, 14, 14), fmap(16, 7, 7), MapToMap, nn.AvgPool2d),
    ("map_up", fmap(8, 7, 7), fmap(4, 14, 14), MapToMap, nn.Upsample),
    ("map_down_frac", fmap(8, 7, 7), fmap(4, 4, 4), MapToMap, nn.Upsample),
    ("nhwc_to_map", nhwc(8, 6, 6), fmap(5, 3, 3), MapToMap, nn.AvgPool2d),
    ("map_to_nhwc", fmap(8, 6, 6), nhwc(5, 6, 6), MapToMap, nn.Identity),
    ("tokens_cls_cls", tokens(12, 4, 1), tokens(10, 4, 1), TokensToTokens, nn.Identity),
    ("tokens_none_none", tokens(12, 4, 0), tokens(10, 4, 0), TokensToTokens, nn.Identity),
    ("tokens_none_cls_grid", tokens(12, 4, 0), tokens(10, 2, 1), TokensToTokens, nn.AvgPool2d),
    ("tokens_cls_none", tokens(12, 4, 1), tokens(10, 4, 0), TokensToTokens, nn.Identity),
    ("tokens_two_one_grid", tokens(12, 4, 2), tokens(10, 3, 1), TokensToTokens, nn.Upsample),
    ("map_to_tokens", fmap(8, 8, 8), tokens(10, 4, 1), MapToTokens, nn.AvgPool2d),
    ("tokens_to_map", tokens(12, 4, 1), fmap(6, 8, 8), TokensToMap, nn.Upsample),
    ("tokens_to_flat", tokens(12, 4, 1), flat(7), ToFlat, type(None)),
    ("map_to_flat", fmap(8, 4, 4), flat(7), ToFlat, type(None)),
    ("flat_to_flat", flat(9), flat(7), ToFlat, type(None)),
]


def probes(src: TensorInfo, dst: TensorInfo, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, *src.shape[1:]), torch.randn(n, *dst.shape[1:])


@pytest.mark.parametrize("src,dst,cls,resample", [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_interface_pair_shape_trace_and_onnx(tmp_path, src, dst, cls, resample):
    probe_src, probe_dst = probes(src, dst)
    layer = make_stitch(src, dst, probe_src=probe_src, probe_dst=probe_dst)
    assert type(layer) is cls
    assert type(getattr(layer, "resample", None)) is resample
    x = probe_src[:3]
    out = layer(x)
    assert tuple(out.shape) == (3, *dst.shape[1:])
    gm = trace(layer, x, allow_export_fallback=False)
    assert graph_info(gm).tracer == "fx"
    assert torch.equal(gm(x), out)
    report = export_onnx(layer, x, tmp_path / "stitch.onnx")
    assert report.max_abs_diff <= 1e-4
    assert report.batch_sizes_checked == (3, 2)


def _exact_case(src: TensorInfo, dst: TensorInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Destination probes produced by a known affine stitch: (weight, bias, probe_src, probe_dst)."""
    teacher = make_stitch(src, dst, init="random")
    weight, bias = torch.randn(teacher.out_channels, teacher.in_channels), torch.randn(teacher.out_channels)
    teacher.set_affine(weight, bias)
    probe_src = torch.randn(30, *src.shape[1:])
    with torch.no_grad():
        probe_dst = teacher(probe_src)
    return weight, bias, probe_src, probe_dst


@pytest.mark.parametrize(
    "src,dst",
    [
        (fmap(8, 14, 14), fmap(5, 7, 7)),
        (fmap(6, 4, 4), fmap(5, 7, 7)),
        (tokens(12, 4, 1), tokens(10, 4, 1)),
        (fmap(8, 8, 8), tokens(10, 4, 0)),
        (tokens(12, 4, 1), fmap(6, 4, 4)),
        (flat(9), flat(7)),
    ],
    ids=["map_down", "map_up", "tokens", "map_to_tokens", "tokens_to_map", "flat"],
)
def test_least_squares_recovers_an_exact_affine_relation(src, dst):
    weight, bias, probe_src, probe_dst = _exact_case(src, dst)
    layer = make_stitch(src, dst, probe_src=probe_src, probe_dst=probe_dst)
    fitted_w, fitted_b = layer.affine()
    assert torch.allclose(fitted_w.double(), weight.double(), atol=1e-6)
    assert torch.allclose(fitted_b.double(), bias.double(), atol=1e-6)


def test_least_squares_closed_form_matches_pinv_in_float64():
    x, y = torch.randn(200, 6, dtype=torch.float64), torch.randn(200, 3, dtype=torch.float64)
    w, b = least_squares(x, y)
    reference = torch.linalg.pinv(torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)) @ y
    assert w.dtype == torch.float64
    assert torch.allclose(w, reference[:-1].T, atol=1e-12) and torch.allclose(b, reference[-1], atol=1e-12)


def test_ridge_shrinks_the_weights_and_keeps_the_fit_at_zero():
    src, dst = fmap(8, 6, 6), fmap(4, 6, 6)
    _, _, probe_src, probe_dst = _exact_case(src, dst)
    probe_dst = probe_dst + 0.5 * torch.randn_like(probe_dst)
    norms = [
        float(make_stitch(src, dst, probe_src=probe_src, probe_dst=probe_dst, ridge=r).affine()[0].norm())
        for r in (0.0, 1e2, 1e4, 1e6)
    ]
    assert norms[0] > norms[1] > norms[2] > norms[3]
    tiny = make_stitch(src, dst, probe_src=probe_src, probe_dst=probe_dst, ridge=1e-9).affine()[0]
    plain = make_stitch(src, dst, probe_src=probe_src, probe_dst=probe_dst).affine()[0]
    assert torch.allclose(tiny, plain, atol=1e-5)


def test_given_matrix_initialises_weight_and_bias():
    src, dst = tokens(6, 2, 1), tokens(4, 2, 1)
    m = torch.randn(7, 4)
    layer = make_stitch(src, dst, init=m)
    w, b = layer.affine()
    assert torch.equal(w, m[:-1].T) and torch.equal(b, m[-1])
    no_bias = make_stitch(src, dst, init=m[:-1]).affine()
    assert torch.equal(no_bias[0], m[:-1].T) and torch.equal(no_bias[1], torch.zeros(4))
    with pytest.raises(ZooError, match=r"init matrix has shape \(5, 4\)"):
        make_stitch(src, dst, init=torch.randn(5, 4))


def test_new_class_token_starts_at_the_probe_mean_and_old_ones_are_kept():
    src, dst = tokens(6, 2, 0), tokens(4, 2, 1)
    probe_src, probe_dst = probes(src, dst)
    layer = make_stitch(src, dst, probe_src=probe_src, probe_dst=probe_dst)
    out = layer(probe_src[:5])
    assert torch.allclose(out[:, 0], probe_dst[:, 0].mean(0).expand(5, -1), atol=1e-6)
    keep = make_stitch(tokens(6, 2, 1), tokens(4, 2, 1), init="random")
    x = torch.randn(3, 5, 6)
    w, b = keep.affine()
    assert torch.allclose(keep(x)[:, 0], x[:, 0] @ w.T + b, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(PassError, match="needs probe activations"):
        make_stitch(fmap(4, 4, 4), fmap(4, 4, 4))
    with pytest.raises(PassError, match="a vector has no positions"):
        make_stitch(flat(4), fmap(4, 2, 2), init="random")
    with pytest.raises(InputShapeError, match="probe_src has shape"):
        make_stitch(fmap(4, 4, 4), fmap(4, 4, 4), probe_src=torch.randn(3, 4, 5, 5), probe_dst=torch.randn(3, 4, 4, 4))
    with pytest.raises(ZooError, match="ridge must be >= 0"):
        make_stitch(fmap(4, 4, 4), fmap(4, 4, 4), init="random", ridge=-1.0)
    with pytest.raises(ZooError, match="unknown stitch init 'svd'"):
        make_stitch(fmap(4, 4, 4), fmap(4, 4, 4), init="svd")


class _TwoStage(nn.Module):
    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(x)))


def test_stitch_blocks_and_models_agree_and_leave_sources_untouched(tmp_path):
    x = torch.randn(16, 3, 8, 8)
    gm_a, gm_b = trace(_TwoStage(6, 8).eval(), x[:2]), trace(_TwoStage(4, 10).eval(), x[:2])
    cut_a, cut_b = "stage1_1", "stage1_1"
    assert cut_a in graph_info(gm_a).cut_points and cut_b in graph_info(gm_b).cut_points
    before = {k: v.clone() for k, v in gm_a.state_dict().items()}
    joined = stitch_models(gm_a, cut_a, gm_b, cut_b, x)
    block_a, block_b = extract_block(gm_a, 0, cut_a), extract_block(gm_b, cut_b, -1)
    with torch.no_grad():
        by_blocks = stitch(block_a, block_b, x, extract_block(gm_b, 0, cut_b).module(x))
        assert torch.allclose(joined(x), by_blocks(x), atol=1e-6)
    report = export_onnx(joined, x[:2], tmp_path / "joined.onnx")
    assert report.max_abs_diff <= 1e-4
    with torch.no_grad():
        for p in joined.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, gm_a.state_dict()[k]) for k, v in before.items())


def test_ls_stitch_between_zoo_models_beats_random_before_training():
    """Two independently trained mnist5k models of different architecture, cut at mid depth (7×7 maps)."""
    from zoocompiler.data import load_dataset
    from zoocompiler.training import evaluate
    from zoocompiler.zoo import list_entries, load_zoo_model

    entries = {e.name: e for e in list_entries()}
    assert entries["resnet_s"].num_classes == entries["vgg_s"].num_classes == 10
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    gm_a = trace(load_zoo_model("resnet_s"), train.x[:2])
    gm_b = trace(load_zoo_model("vgg_s"), train.x[:2])
    cut_a, cut_b = "layer1_0_act2", "features_7"  # resnet after stage 1 (16×7×7), vgg after 2nd pool (32×7×7)
    assert cut_a in graph_info(gm_a).cut_points and cut_b in graph_info(gm_b).cut_points
    probe = train.x[:300]
    accuracy = {
        init: evaluate(stitch_models(gm_a, cut_a, gm_b, cut_b, probe, init=init), test) for init in ("ls", "random")
    }
    assert accuracy["ls"] > 0.5
    assert accuracy["ls"] > accuracy["random"] + 0.3
