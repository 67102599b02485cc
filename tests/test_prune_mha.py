"""nn.MultiheadAttention: heads and the input width are prunable; the pruned module is an
ExplicitMultiheadAttention that equals the masked reference and exports."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers.pruning import assert_close, random_plan, randomized
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.vision_transformer import VisionTransformer

from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import run_analysis, trace
from zoocompiler.passes.rewrite.explicit_mha import ExplicitMultiheadAttention
from zoocompiler.passes.rewrite.prune import masked_reference, prune


@settings(max_examples=20, deadline=None)
@given(
    batch_first=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    bias=st.booleans(),
    masks=st.sampled_from(["none", "attn_bool", "attn_float", "padding", "both"]),
    cross=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_explicit_mha_equals_nn_multihead_attention(batch_first, need_weights, average, bias, masks, cross, seed):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(12, 3, bias=bias, batch_first=batch_first).eval()
    explicit = ExplicitMultiheadAttention.from_sliced(mha, mha.head_dim).eval()
    B, L, S = 2, 5, 4 if cross else 5
    q = torch.randn(B, L, 12)
    kv = torch.randn(B, S, 12) if cross else q
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    kwargs = {"need_weights": need_weights, "average_attn_weights": average}
    if masks in ("attn_bool", "both"):
        kwargs["attn_mask"] = torch.rand(L, S) > 0.7
        kwargs["attn_mask"][:, 0] = False
    if masks == "attn_float":
        kwargs["attn_mask"] = torch.randn(L, S)
    if masks in ("padding", "both"):
        kwargs["key_padding_mask"] = torch.zeros(B, S, dtype=torch.bool)
        kwargs["key_padding_mask"][0, -1] = True
    with torch.no_grad():
        want, want_w = mha(q, kv, kv, **kwargs)
        got, got_w = explicit(q, kv, kv, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-4)


def _vit() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    return model, torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("mode", ["pin", "prune"])
def test_torchvision_vit_heads_prunable_and_pruned_equals_masked(mode, tmp_path):
    model, x = _vit()
    gm = randomized(run_analysis(trace(model, x, analyze=False), layernorm_streams=mode))
    heads = [g for g in graph_info(gm).unit_groups if g.kind == "head"]
    assert len(heads) == 2 and not any(g.pinned for g in heads)
    assert not any("MultiheadAttention" in r for g in graph_info(gm).unit_groups for r in g.reasons)
    for seed in range(3):
        plan = random_plan(gm, seed)
        result = prune(gm, plan, strategy_macs=False)
        replaced = [m for m in result.module.modules() if isinstance(m, ExplicitMultiheadAttention)]
        assert replaced and any(m.num_heads < 4 for m in replaced)
        ref = masked_reference(gm, plan)
        with torch.no_grad():
            y, y_ref = result.module(x), ref(x)
        assert_close(y, y_ref, float(y_ref.abs().max()))
    report = export_onnx(result.module, x, tmp_path / "vit.onnx")
    assert report.exporter == "dynamo" and report.rel_diff < 1e-4


def test_mha_with_bias_kv_stays_pinned_with_its_reason():
    class WithBiasKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 12)
            self.attn = nn.MultiheadAttention(12, 3, add_bias_kv=True, batch_first=True)
            self.head = nn.Linear(12, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.head(self.attn(h, h, h, need_weights=False)[0])

    gm = run_analysis(trace(WithBiasKV().eval(), torch.randn(2, 5, 6), analyze=False))
    heads = next(g for g in graph_info(gm).unit_groups if g.kind == "head")
    assert heads.pinned and any("bias_k" in r for r in heads.reasons)


def test_mha_macs_are_counted_through_the_inference_fast_path():
    """The fused fast-path kernel has no flop formula; the analysis and the prune report count the slow path."""
    from zoocompiler.core.modules import count_macs
    from zoocompiler.passes.analysis.costs import total_cost

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model, x = SelfAttention().eval(), torch.randn(2, 5, 16)
    L, E = 5, 16
    want = 2 * (L * E * 3 * E + 2 * L * L * E + L * E * E)  # q/k/v, scores and weighted sum, out_proj; batch 2
    assert count_macs(model, x, eval=True) == want
    assert total_cost(trace(model, x)).flops // 2 == want
