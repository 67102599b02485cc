"""torchvision Swin (v1 and v2): heads and the residual stream prunable through shifted-window attention;
the pruned call is explicit_shifted_window_attention, equal to the masked reference, and exports."""

from __future__ import annotations

import pytest
import torch
from helpers.pruning import assert_close, random_plan, randomized
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
    shifted_window_attention,
)

from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import run_analysis, trace
from zoocompiler.passes.analysis.plans import plan_by_importance
from zoocompiler.passes.rewrite.explicit_swin import explicit_shifted_window_attention
from zoocompiler.passes.rewrite.prune import masked_reference, prune


@pytest.mark.parametrize("size, shift", [(8, [2, 2]), (6, [2, 2]), (4, [2, 2]), (8, [0, 0]), (5, [1, 2])])
@pytest.mark.parametrize("v2", [False, True])
def test_explicit_function_equals_torchvision(size, shift, v2):
    g = torch.Generator().manual_seed(size)
    x, qkv_w, proj_w = torch.randn(2, size, size, 16, generator=g), torch.randn(48, 16, generator=g), torch.randn(
        16, 16, generator=g)
    rpb, qkv_b, proj_b = torch.randn(1, 2, 16, 16, generator=g), torch.randn(48, generator=g), torch.randn(16,
                                                                                                          generator=g)
    logit = torch.randn(2, 1, 1, generator=g) if v2 else None
    args = (x, qkv_w, proj_w, rpb, [4, 4], 2, shift)
    kwargs = {"qkv_bias": qkv_b, "proj_bias": proj_b, "logit_scale": logit, "training": False}
    want = shifted_window_attention(*args, **kwargs)
    got = explicit_shifted_window_attention(*args, **kwargs, head_dim=8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _swin(v2: bool):
    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    model = SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10, **extra).eval()
    return model, torch.randn(2, 3, 48, 48)  # 12×12 then 6×6 tokens: shifted windows and padding


@pytest.mark.parametrize(
    "v2, mode",
    [(False, "prune"), pytest.param(True, "prune", marks=pytest.mark.slow),
     pytest.param(False, "pin", marks=pytest.mark.slow), pytest.param(True, "pin", marks=pytest.mark.slow)],
)
def test_swin_pruned_equals_masked(v2, mode, tmp_path):
    model, x = _swin(v2)
    gm = randomized(run_analysis(trace(model, x, analyze=False), layernorm_streams=mode))
    groups = graph_info(gm).unit_groups
    heads = [g for g in groups if g.kind == "head"]
    assert len(heads) == 4 and not any(g.pinned for g in heads)
    if mode == "prune":
        assert [g.reasons for g in groups if g.pinned] == [["model input"], ["model output"]]
    for plan in (plan_by_importance(gm, 0.5, scope="group"), random_plan(gm, 1)):
        result = prune(gm, plan, strategy_macs=False)
        assert any(n.target is explicit_shifted_window_attention for n in result.module.graph.nodes)
        ref = masked_reference(gm, plan)
        with torch.no_grad():
            y, y_ref, y_full = result.module(x), ref(x), gm(x)
        assert_close(y, y_ref, float(y_ref.abs().max()))
        assert (y_full - y_ref).abs().max() > 1e-4
    report = export_onnx(result.module, x, tmp_path / "swin.onnx")
    assert report.exporter == "dynamo" and report.rel_diff < 1e-4
