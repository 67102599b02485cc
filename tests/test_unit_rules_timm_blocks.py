"""Rules for timm building blocks that pinned groups before: window partition/reverse, a q/k/v bias
concatenated from parameters (BEiT/EVA), reshape sizes read from another unit count, and views of
sliced parameters. Each: a generated graph and a real architecture, pruned == masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.pruning import assert_close, random_plan, randomized
from timm.models.swin_transformer import window_partition, window_reverse

from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import run_analysis, trace
from zoocompiler.passes.analysis.plans import plan_by_importance
from zoocompiler.passes.rewrite.prune import masked_reference, prune
from zoocompiler.sources import load_model


def _pruned_equals_masked(model: nn.Module, x: torch.Tensor, mode: str = "prune", seeds=(0, 1)) -> list:
    gm = randomized(run_analysis(trace(model.eval(), x, analyze=False), layernorm_streams=mode))
    for seed in seeds:
        plan = random_plan(gm, seed) if seed else plan_by_importance(gm, 0.5, scope="group")
        result, ref = prune(gm, plan, strategy_macs=False), masked_reference(gm, plan)
        with torch.no_grad():
            y, y_ref, y_full = result.module(x), ref(x), gm(x)
        assert_close(y, y_ref, float(y_ref.abs().max()))
        assert (y_full - y_ref).abs().max() > 1e-5
    return graph_info(gm).unit_groups


class Windowed(nn.Module):
    """NHWC features, window attention-like mixing inside windows, windows reversed."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.embed(x.permute(0, 2, 3, 1))  # B H W C
        w = window_partition(h, (2, 2))  # windows × 2 × 2 × C
        w = self.mix(w) + w.mean((1, 2), keepdim=True)
        return self.head(window_reverse(w, (2, 2), 4, 4) + h).mean((1, 2))


def test_window_partition_and_reverse_carry_channels():
    groups = _pruned_equals_masked(Windowed(), torch.randn(2, 3, 4, 4))
    assert [g.reasons for g in groups if g.pinned] == [["model input"], ["model output"]]


class CatBiasAttention(nn.Module):
    """BEiT's pattern: F.linear with cat((q_bias, k_bias zeros, v_bias)), output reshaped by the input width."""

    def __init__(self, dim: int = 12, heads: int = 3):
        super().__init__()
        self.embed, self.heads = nn.Linear(5, dim), heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj, self.head = nn.Linear(dim, dim), nn.Linear(dim, 2)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)  # C: the stream's width
        return self.head((x + self.proj(a)).mean(1))


def test_concatenated_bias_and_size_from_another_unit_count():
    groups = _pruned_equals_masked(CatBiasAttention(), torch.randn(2, 6, 5))
    heads = [g for g in groups if g.kind == "head"]
    assert heads and not any(g.pinned for g in heads)
    assert [g.reasons for g in groups if g.pinned] == [["model input"], ["model output"]]


class ScaledByView(nn.Module):
    """MetaFormer's layer scale ``scale.view(C, 1, 1)`` and a relative-bias-like ``table[index].view(N, N, C)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.scale = nn.Conv2d(3, 4, 3, padding=1), nn.Parameter(torch.randn(4))
        self.table = nn.Parameter(torch.randn(7, 4))
        self.register_buffer("index", torch.randint(0, 7, (16,)))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x) * self.scale.view(4, 1, 1)
        bias = self.table[self.index].view(4, 4, 4).permute(2, 0, 1)  # C × 4 × 4: sizes 4 everywhere
        return self.head((y + bias).mean((2, 3)))


def test_views_of_sliced_parameters_take_the_kept_count():
    groups = _pruned_equals_masked(ScaledByView(), torch.randn(2, 3, 4, 4))
    assert any(not g.pinned and g.size == 4 for g in groups)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, px",
    [
        ("timm:swin_tiny_patch4_window7_224,num_classes=10,img_size=56,depths=(1,1,1,1)", 56),
        ("timm:beit_base_patch16_224,num_classes=10,img_size=32,depth=2", 32),
        ("timm:caformer_s18,num_classes=10", 64),
        ("timm:gcvit_xxtiny,num_classes=10,img_size=64", 64),
        ("timm:coatnet_pico_rw_224,num_classes=10,img_size=64", 64),
    ],
)
def test_architectures_prune_exactly(spec, px):
    groups = _pruned_equals_masked(load_model(spec), torch.randn(2, 3, px, px), mode="auto", seeds=(0,))
    assert not any("unknown op" in r for g in groups for r in g.reasons)
