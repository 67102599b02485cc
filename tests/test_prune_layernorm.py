"""Opt-in pruning of LayerNorm-coupled residual streams (``layernorm_streams="prune"``).

The pruned model must equal the *masked-LN reference*: removed units zeroed at every member and
every LayerNorm over them computing its statistics over the kept units only. Checked on timm
ViT/DeiT/ConvNeXt, torchvision ConvNeXt and a hand-made pre-norm transformer (nn.LayerNorm module,
functional layer_norm, an affine-free LayerNorm, a channels-first LayerNorm) at 25/50/75 %, with
exact parameter counts and ONNX parity; the default mode still pins.
"""

from __future__ import annotations

import copy
import json
import random
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.architectures import fresh_model, traced
from helpers.pruning import assert_close, expected_params, randomized

from zoocompiler.core.errors import PassError
from zoocompiler.core.modules import count_params
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import run_analysis, trace
from zoocompiler.passes.analysis.plans import (
    Plan,
    graph_fingerprint,
    group_keys,
    plan_by_importance,
    producers,
    validate_plan,
)
from zoocompiler.passes.analysis.unit_groups import describe_group, group_approx
from zoocompiler.passes.rewrite.masked_stats import masked_layer_norm
from zoocompiler.passes.rewrite.prune import masked_reference, prune
from zoocompiler.passes.rewrite.prune_layout import compute_layout, tensor_of

LN_TEXT = "LayerNorm statistics over the kept units"

# ----------------------------------------------------------------------------- models


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an N×C×H×W map (as timm's / torchvision's LayerNorm2d), traced through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class Block(nn.Module):
    """Pre-norm block: nn.LayerNorm → attention (literal head sizes), functional layer_norm → MLP, layer scale."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2_weight, self.norm2_bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))
        h = F.layer_norm(x, (x.shape[-1],), self.norm2_weight, self.norm2_bias, 1e-6)
        return x + self.gamma * self.fc2(F.gelu(self.fc1(h)))


class PreNormTransformer(nn.Module):
    """Conv stem with a channels-first LayerNorm, patch embedding, class token, two pre-norm blocks, an
    affine-free final nn.LayerNorm and a classifier on the class token. Input 3×16×16."""

    def __init__(self, stem: int = 12, dim: int = 24, heads: int = 3, classes: int = 5):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, stem, 3, padding=1), ChannelsFirstLayerNorm(stem)
        self.patch = nn.Conv2d(stem, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.Sequential(Block(dim, heads), Block(dim, heads))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(F.gelu(self.stem_norm(self.stem(x)))).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def small_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = PreNormTransformer().eval()
    with torch.no_grad():  # non-trivial norm affines, so a wrong statistic shows at the output
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model, torch.randn(2, 3, 16, 16)


def analysed(model: nn.Module, x: torch.Tensor, mode: str) -> torch.fx.GraphModule:
    return run_analysis(trace(model, x, analyze=False), layernorm_streams=mode)


def prune_mode(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of an annotated graph re-analysed with ``layernorm_streams="prune"``."""
    gm = copy.deepcopy(gm)
    return run_analysis(gm, layernorm_streams="prune")


# ----------------------------------------------------------------------------- helpers


def group_with(gm: torch.fx.GraphModule, weight: str):
    """The group of ``weight``'s output units (dim 0)."""
    return next(g for g in graph_info(gm).unit_groups if any(m.param == weight and m.dim == 0 for m in g.members))


def ln_groups(gm: torch.fx.GraphModule) -> list:
    return [g for g in graph_info(gm).unit_groups if group_approx(g) == "layernorm"]


def plan_at(gm: torch.fx.GraphModule, frac: float, seed: int, strategy: str = "union") -> Plan:
    """Every prunable group keeps a random ``1 - frac`` of its units (one set for all producers, so every
    producer of a stream keeps the same units; ``pad``: random per-producer subsets of that set)."""
    rng = random.Random(seed)
    keys = group_keys(gm)
    plan = Plan(strategy=strategy, meta={"fingerprint": graph_fingerprint(gm)})
    for g in graph_info(gm).unit_groups:
        if g.pinned or g.size < 2:
            continue
        key = keys[g.gid]
        keep = sorted(rng.sample(range(g.size), max(1, round(g.size * (1 - frac)))))
        plan.keep[key] = keep
        prods = producers(g)
        if strategy == "pad" and len(prods) >= 2:
            plan.producer_keep[key] = {p: sorted(rng.sample(keep, max(1, len(keep) * 2 // 3))) for p in prods}
            plan.producer_keep[key][next(iter(prods))] = keep  # the union stays the group's keep
    return plan


def zeroed_only(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """The plain masked model (removed units zeroed, LayerNorms unchanged): what the pruned model is *not*."""
    ref = copy.deepcopy(gm)
    with torch.no_grad():
        for name, dims in compute_layout(gm, plan).zero.items():
            for dim, positions in dims.items():
                tensor_of(ref, name).index_fill_(dim, torch.tensor(positions), 0.0)
    return ref


def masked_norms(ref: torch.fx.GraphModule) -> int:
    return sum(1 for n in ref.graph.nodes if n.target is masked_layer_norm)


def check_prune(gm: torch.fx.GraphModule, x: torch.Tensor, plan: Plan, onnx_path=None) -> None:
    """pruned == masked-LN reference (≤ 1e-5 × scale), != the plain zeroed model, exact parameter count,
    smaller MACs; optionally ONNX parity (TorchScript exporter: the same graph, ~10× faster here)."""
    with torch.no_grad():
        scale = gm(x).abs().max().item()
    result = prune(gm, plan, strategy_macs=False)
    ref = masked_reference(gm, plan)
    with torch.no_grad():
        pruned_out, ref_out, plain_out = result.module(x), ref(x), zeroed_only(gm, plan)(x)
    assert_close(pruned_out, ref_out, scale)
    assert (pruned_out - plain_out).abs().max().item() > 1e-3 * max(1.0, scale)  # the LN masking matters
    assert masked_norms(ref) > 0
    if not plan.producer_keep:
        assert count_params(result.module) == expected_params(gm, plan) == result.report.params_after
    assert result.report.macs_after < result.report.macs_before
    assert result.report.layernorm_streams == "prune"
    stream_keys = {group_keys(gm)[g.gid] for g in ln_groups(gm)}
    assert {k for k, v in result.report.per_group.items() if v.get("approx") == "layernorm"} == stream_keys
    if onnx_path is not None:
        report = export_onnx(result.module, x, onnx_path, exporters=("torchscript",))
        assert report.max_abs_diff <= 1e-4 * max(1.0, scale)


# ----------------------------------------------------------------------------- the masked LayerNorm


def test_masked_layer_norm_is_layer_norm_over_the_kept_units():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)
    kept = [0, 2, 3, 7]
    mask = torch.zeros(8)
    mask[kept] = 1.0
    out = masked_layer_norm(x, (8,), w * mask, b * mask, 1e-5, mask)
    want = F.layer_norm(x[..., kept], (4,), w[kept], b[kept], 1e-5)
    assert torch.allclose(out[..., kept], want, atol=1e-6)
    assert torch.count_nonzero(out[..., [1, 4, 5, 6]]) == 0
    # over two dims (C, W) with units on C: statistics over the kept C × all W positions
    y = torch.randn(2, 3, 6, 4, generator=g)
    mask2 = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]).view(6, 1)
    out2 = masked_layer_norm(y, (6, 4), None, None, 1e-5, mask2)
    keep2 = [0, 2, 3, 5]
    assert torch.allclose(out2[:, :, keep2], F.layer_norm(y[:, :, keep2], (4, 4), eps=1e-5), atol=1e-6)
    assert torch.count_nonzero(out2[:, :, [1, 4]]) == 0


# ----------------------------------------------------------------------------- analysis option


def test_default_pins_and_prune_mode_marks_the_streams():
    model, x = small_model()
    pinned, relaxed = analysed(model, x, "pin"), analysed(model, x, "prune")
    assert graph_info(pinned).extra["layernorm_streams"] == "pin"
    assert graph_info(relaxed).extra["layernorm_streams"] == "prune"
    by_key_pin = {group_keys(pinned)[g.gid]: g for g in graph_info(pinned).unit_groups}
    by_key_ln = {group_keys(relaxed)[g.gid]: g for g in graph_info(relaxed).unit_groups}
    assert by_key_pin.keys() == by_key_ln.keys()  # same groups, only their pins differ
    streams = {"stem.weight:conv_out", "patch.weight:conv_out"}
    assert {k for k, g in by_key_pin.items() if g.pinned} == {"x:value", "head.weight:linear_out"} | streams
    assert all("LayerNorm over the unit dim" in by_key_pin[k].reasons[0] for k in streams)
    assert {group_keys(relaxed)[g.gid] for g in ln_groups(relaxed)} == streams
    assert {k for k, g in by_key_ln.items() if g.pinned} == {"x:value", "head.weight:linear_out"}
    stream = by_key_ln["patch.weight:conv_out"]
    roles = {m.param: m.role for m in stream.members if m.param is not None}
    for name in ("blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.1.norm2_weight", "blocks.1.norm2_bias"):
        assert roles[name] == "norm"
    assert roles["cls_token"] == roles["pos_embed"] == roles["blocks.0.gamma"] == "param"
    assert roles["blocks.1.fc1.weight"] == roles["head.weight"] == "linear_in"
    assert stream.size == 24 and LN_TEXT in describe_group(stream)
    assert LN_TEXT not in describe_group(by_key_pin["patch.weight:conv_out"])
    assert by_key_ln["stem.weight:conv_out"].size == 12 and by_key_ln["stem.weight:conv_out"].kind == "channel"


def test_unknown_mode_fails_and_mha_stream_is_prunable():
    model, x = small_model()
    with pytest.raises(PassError, match="unknown layernorm_streams 'maybe'"):
        analysed(model, x, "maybe")

    class MHABlock(nn.Module):  # pruned, nn.MultiheadAttention becomes ExplicitMultiheadAttention: the stream prunes
        def __init__(self):
            super().__init__()
            self.embed, self.norm = nn.Linear(6, 8), nn.LayerNorm(8)
            self.attn, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            x = self.embed(x)
            h = self.norm(x)
            return self.head((x + self.attn(h, h, h, need_weights=False)[0]).mean(1))

    model, x = MHABlock().eval(), torch.randn(2, 5, 6)
    gm = analysed(model, x, "prune")
    stream = group_with(gm, "embed.weight")
    assert not stream.pinned and group_approx(stream) == "layernorm"
    plan = plan_at(gm, 0.5, seed=0)
    with torch.no_grad():
        assert_close(prune(gm, plan).module(x), masked_reference(gm, plan)(x), 1.0)


def test_plan_records_the_mode_and_refuses_the_other():
    model, x = small_model()
    relaxed = analysed(model, x, "prune")
    plan = plan_by_importance(relaxed, 0.5, scope="group")
    assert plan.meta["layernorm_streams"] == "prune"
    assert len(plan.keep["patch.weight:conv_out"]) == 12 and len(plan.keep["stem.weight:conv_out"]) == 6
    replayed = Plan.from_json(plan.to_json())
    validate_plan(analysed(model, x, "prune"), replayed)  # a fresh trace, same mode: fine
    with pytest.raises(PassError, match="layernorm_streams='prune'.*analysed with 'pin'"):
        validate_plan(analysed(model, x, "pin"), replayed)
    assert json.loads(plan.to_json())["meta"]["layernorm_streams"] == "prune"


# ----------------------------------------------------------------------------- pruned == masked-LN reference


@pytest.mark.parametrize("frac", [0.25, 0.5, 0.75])
def test_small_transformer_pruned_equals_masked_ln_reference(frac):
    model, x = small_model()
    gm = analysed(model, x, "prune")
    plan = plan_at(gm, frac, seed=int(frac * 100))
    assert {"patch.weight:conv_out", "stem.weight:conv_out"} <= plan.keep.keys()
    check_prune(gm, x, plan)
    ref = masked_reference(gm, plan)
    assert masked_norms(ref) == 6  # stem, 2 × (norm1, norm2), final: every LayerNorm over a stream


def test_small_transformer_pad_strategy_and_onnx(tmp_path):
    model, x = small_model()
    gm = analysed(model, x, "prune")
    plan = plan_at(gm, 0.5, seed=3, strategy="pad")
    assert "patch.weight:conv_out" in plan.producer_keep
    check_prune(gm, x, plan)
    result = prune(gm, plan, strategy_macs=False)
    assert result.report.scatters > 0
    report = export_onnx(result.module, x, tmp_path / "pad.onnx")  # default exporters (dynamo first)
    with torch.no_grad():
        assert report.max_abs_diff <= 1e-4 * max(1.0, gm(x).abs().max().item())


@pytest.mark.parametrize(
    ("arch_id", "frac"),
    [
        ("timm_vit_tiny", 0.5),
        ("timm_convnext_atto", 0.5),
        pytest.param("timm_deit_tiny", 0.5, marks=pytest.mark.slow),
        pytest.param("timm_vit_tiny", 0.25, marks=pytest.mark.slow),
        pytest.param("timm_vit_tiny", 0.75, marks=pytest.mark.slow),
        pytest.param("timm_convnext_atto", 0.25, marks=pytest.mark.slow),
        pytest.param("timm_convnext_atto", 0.75, marks=pytest.mark.slow),
        pytest.param("timm_deit_tiny", 0.25, marks=pytest.mark.slow),
        pytest.param("timm_deit_tiny", 0.75, marks=pytest.mark.slow),
        pytest.param("tv_convnext_tiny", 0.5, marks=pytest.mark.slow),
    ],
)
def test_architecture_pruned_equals_masked_ln_reference(arch_id, frac, tmp_path):
    _, x, base = traced(arch_id)
    pinned = randomized(base)
    assert not ln_groups(pinned)
    gm = prune_mode(pinned)
    streams = ln_groups(gm)
    assert streams and all(g.prunable for g in streams)
    plan = plan_at(gm, frac, seed=zlib.crc32(f"{arch_id}:{frac}".encode()) % 1000)
    assert {group_keys(gm)[g.gid] for g in streams} <= plan.keep.keys()
    check_prune(gm, x, plan, onnx_path=tmp_path / "pruned.onnx")


def test_stream_counts_vit_and_convnext():
    """Which groups the option frees: the ViT's one embedding stream, ConvNeXt's four stage streams."""
    for arch_id, sizes in (("timm_vit_tiny", [192]), ("timm_convnext_atto", [40, 80, 160, 320])):
        _, _, base = traced(arch_id)
        gm = prune_mode(base)
        assert [g.size for g in ln_groups(gm)] == sizes
        pinned_before = sum(g.pinned for g in graph_info(base).unit_groups)
        assert sum(g.pinned for g in graph_info(gm).unit_groups) == pinned_before - len(sizes) == 2


def test_torchvision_vit_stream_is_prunable_through_multihead_attention():
    gm = analysed(fresh_model("tv_vit_b_16"), torch.randn(1, 3, 32, 32), "prune")  # torchvision:vit_b_16
    stream = group_with(gm, "conv_proj.weight")
    assert not stream.pinned and group_approx(stream) == "layernorm"
    assert ln_groups(gm) == [stream]


# ----------------------------------------------------------------------------- CLI


def test_cli_prune_with_layernorm_streams(tmp_path, capsys):
    from zoocompiler.cli import main

    out = tmp_path / "vit"
    args = ["prune", "timm:vit_tiny_patch16_224,img_size=32", "--input-shape", "3,32,32", "--batch", "1"]
    code = main([*args, "--ratio", "0.5", "--layernorm-streams", "prune", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["layernorm_streams"] == "prune"
    stream = report["prune"]["per_group"]["patch_embed.proj.weight:conv_out"]
    assert stream == {"kept": 96, "size": 192, "strategy": "union", "approx": "layernorm"}
    assert json.loads((out / "plan.json").read_text())["meta"]["layernorm_streams"] == "prune"
    capsys.readouterr()
    again = tmp_path / "again"  # replay: the mode comes from the plan
    assert main([*args, "--plan", str(out / "plan.json"), "--out", str(again), "--json"]) == 0
    replay = json.loads((again / "report.json").read_text())
    assert replay["prune"]["layernorm_streams"] == "prune"
    assert replay["prune"]["params_after"] == report["prune"]["params_after"]
