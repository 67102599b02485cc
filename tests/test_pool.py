"""The Learngene Pool (paper 002, zoocompiler/pipelines/pool/): ancestry shapes, distillation, the pool, its store.

* auxiliary models derived from an ancestry's own configuration have the parameter count a closed formula gives,
  heads of the ancestry's width, and run; ``ancestry_shape`` round-trips timm configurations and refuses
  ancestries that are not a uniform block stack (``PassError`` naming what qualifies); bad ``derive`` options
  are ``ZooError`` with a fix;
* dense distillation levels (Sec. "Dense Distillation"); the transformation matrices W, M are trained and the
  block/attention losses through them fall; with d == d' they are the identity; the ancestry stays frozen;
  ``Taps`` capture the attention output before the residual add;
* descendants: the end paths are the auxiliary models exactly, every stitched path equals the manual
  composition small blocks → stitch → large blocks + head; parameters add up and grow with the large part;
* stitch inits ``tm`` (matrix transpose), ``ls`` (fits better than random) and seeded ``random``; stitched
  descendants export to ONNX with parity; fine-tuning samples several paths and trains only the sampled one;
* the pool directory: written by ``distill_pool``, read back with the same weights; a foreign format or edited
  weights are ``CheckpointError``; ``pick_descendant`` under budgets;
* ``stack_boundaries`` on a traced ViT: the cuts between consecutive boundaries are the timm blocks.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import Block, VisionTransformer

from zoocompiler.core.budget import Budget
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import BudgetError, CheckpointError, PassError, ZooError
from zoocompiler.core.modules import count_params
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.cut_points import stack_boundaries
from zoocompiler.passes.rewrite.blocks import extract_block
from zoocompiler.pipelines.pool import pipeline, store
from zoocompiler.pipelines.pool.ancestry import QUALIFY, VitShape, ancestry_shape, build_vit
from zoocompiler.pipelines.pool.config import PoolDistillConfig
from zoocompiler.pipelines.pool.distill import Distiller, Taps, Transforms, dense_levels, distill
from zoocompiler.pipelines.pool.pool import LearngenePool, example_batch, finetune
from zoocompiler.sources import load_model
from zoocompiler.training import evaluate

TINY = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2)
SPEC = ("timm:vit_tiny_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,depth=4,embed_dim=64,"
        "num_heads=4")
X_SHAPE = (2, 1, 28, 28)


# ----------------------------------------------------------------------------- helpers


def tiny_vit(seed: int = 0, noise: float = 0.0, **overrides) -> VisionTransformer:
    """A tiny timm ViT (eval mode); ``noise`` adds N(0, noise²) to every parameter so outputs are not near zero."""
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **overrides}).eval()
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    return model


def noisy(model: nn.Module, seed: int, noise: float = 0.1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model.eval()


def vit_params(*, d: int, depth: int, mlp_ratio: float, img: int = 28, patch: int = 7, chans: int = 1,
               classes: int = 10, qkv_bias: bool = True, class_token: bool = True, reg_tokens: int = 0) -> int:
    """Parameters of a timm ViT by formula: patch embedding (conv + bias), class/register tokens, position
    embedding (patches + prefix tokens), per block LN, qkv, proj, LN, fc1, fc2, then final LN and head."""
    patches = (img // patch) ** 2
    hidden = int(d * mlp_ratio)
    prefix = int(class_token) + reg_tokens
    embed = d * chans * patch * patch + d
    pos = (patches + prefix) * d
    block = (2 * d                                  # norm1
             + 3 * d * d + (3 * d if qkv_bias else 0)  # qkv
             + d * d + d                            # proj
             + 2 * d                                # norm2
             + d * hidden + hidden                  # fc1
             + hidden * d + d)                      # fc2
    return embed + prefix * d + pos + depth * block + 2 * d + d * classes + classes


def embed_tokens(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The tokens timm feeds its first block."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


def prefix_out(vit: VisionTransformer, x: torch.Tensor, low: int) -> torch.Tensor:
    """Tokens after timm block ``low`` (1-based; 0 = the embedding)."""
    h = embed_tokens(vit, x)
    for block in vit.blocks[:low]:
        h = block(h)
    return h


def manual_descendant(pool: LearngenePool, x: torch.Tensor, low: int) -> torch.Tensor:
    """Small blocks 1..low → stitch (one linear map per token) → large blocks low+1..l, norm and head."""
    h = prefix_out(pool.small, x, low)
    proj = pool.stitches[str(low)].proj
    h = F.linear(h, proj.weight, proj.bias)
    for block in pool.large.blocks[low:]:
        h = block(h)
    return pool.large.forward_head(pool.large.norm(h))


def make_pool(depth: int = 3, small_dim: int = 16, seed: int = 0) -> LearngenePool:
    """Two random rows derived from the tiny ancestry (small d'=16, large d=64, ``depth`` blocks), noisy weights."""
    shape = ancestry_shape(tiny_vit())
    torch.manual_seed(seed)
    small = noisy(build_vit(shape.derive(depth, small_dim)), seed + 1)
    large = noisy(build_vit(shape.derive(depth, shape.embed_dim)), seed + 2)
    return LearngenePool(small, large, example_batch((1, 28, 28))).eval()


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def subset(split: DataSplit, n: int) -> DataSplit:
    return replace(split, x=split.x[:n], y=split.y[:n])


@pytest.fixture(scope="module")
def mnist_train() -> DataSplit:
    return load_dataset("mnist5k", "train")


# ----------------------------------------------------------------------------- 1. auxiliary models by formula


@st.composite
def ancestry_and_aux(draw):
    head_dim = draw(st.sampled_from([4, 8, 16]))
    heads = draw(st.integers(1, 4))
    depth = draw(st.integers(2, 5))
    mlp_ratio = draw(st.sampled_from([1.0, 2.0, 4.0]))
    qkv_bias = draw(st.booleans())
    blocks = draw(st.integers(1, depth - 1))
    dim = head_dim * draw(st.integers(1, heads))
    return dict(head_dim=head_dim, heads=heads, depth=depth, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, blocks=blocks,
                dim=dim)


@settings(max_examples=15, deadline=None)
@given(case=ancestry_and_aux())
def test_derived_aux_params_match_formula(case):
    torch.manual_seed(0)
    width = case["heads"] * case["head_dim"]
    anc = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=width,
                            depth=case["depth"], num_heads=case["heads"], mlp_ratio=case["mlp_ratio"],
                            qkv_bias=case["qkv_bias"]).eval()
    assert count_params(anc) == vit_params(d=width, depth=case["depth"], mlp_ratio=case["mlp_ratio"],
                                           qkv_bias=case["qkv_bias"])
    shape = ancestry_shape(anc)
    assert shape.head_dim == case["head_dim"]
    aux_shape = shape.derive(case["blocks"], case["dim"])
    assert (aux_shape.depth, aux_shape.embed_dim, aux_shape.num_heads) == (
        case["blocks"], case["dim"], case["dim"] // case["head_dim"])
    aux = build_vit(aux_shape)
    assert count_params(aux) == vit_params(d=case["dim"], depth=case["blocks"], mlp_ratio=case["mlp_ratio"],
                                           qkv_bias=case["qkv_bias"])
    assert len(aux.blocks) == case["blocks"] and aux.embed_dim == case["dim"]
    for block in aux.blocks:
        assert block.attn.num_heads == case["dim"] // case["head_dim"]
        assert block.attn.head_dim == case["head_dim"]
        assert block.mlp.fc1.out_features == int(case["dim"] * case["mlp_ratio"])
        assert (block.attn.qkv.bias is not None) == case["qkv_bias"]
    with torch.no_grad():
        out = aux(torch.randn(*X_SHAPE))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_derived_aux_of_tiny_ancestry_by_hand():
    shape = ancestry_shape(tiny_vit())
    assert (shape.embed_dim, shape.depth, shape.num_heads, shape.head_dim, shape.mlp_ratio) == (64, 4, 4, 16, 2.0)
    # d'=16 (one head of 16), 2 blocks: conv 16·49+16, cls 16, pos 17·16, 2 blocks of 2224, LN 32, head 170
    assert count_params(build_vit(shape.derive(2, 16))) == 800 + 16 + 272 + 2 * 2224 + 32 + 170 == 5738
    wide = build_vit(shape.derive(3, 64))
    assert count_params(wide) == vit_params(d=64, depth=3, mlp_ratio=2.0)
    assert wide.blocks[0].attn.num_heads == 4
    assert build_vit(shape.derive(3, 32)).blocks[2].attn.num_heads == 2
    assert build_vit(shape.derive(1, 48))(torch.randn(*X_SHAPE)).shape == (2, 10)


# ----------------------------------------------------------------------------- 2. ancestry_shape round trip / refusal


ROUND_TRIP = {
    "default": {},
    "no_cls_avg": dict(class_token=False, global_pool="avg"),
    "cls_avg": dict(global_pool="avg"),
    "no_qkv_bias": dict(qkv_bias=False),
    "reg_tokens": dict(reg_tokens=2),
    "reg_no_embed_class": dict(reg_tokens=1, no_embed_class=True),
    "qk_norm_layerscale_prenorm": dict(qk_norm=True, init_values=1e-5, pre_norm=True),
}


@pytest.mark.parametrize("overrides", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_ancestry_shape_round_trip(overrides):
    model = tiny_vit(**overrides)
    shape = ancestry_shape(model)
    rebuilt = build_vit(shape)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert ancestry_shape(rebuilt) == shape
    assert VitShape.from_dict(json.loads(json.dumps(shape.to_dict()))) == shape
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(*X_SHAPE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    if "reg_tokens" in overrides:
        assert shape.reg_tokens == overrides["reg_tokens"]
    if not overrides.get("qkv_bias", True):
        assert shape.qkv_bias is False
    if overrides.get("global_pool") == "avg":
        assert shape.global_pool == "avg" and shape.fc_norm


def _resnet() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, in_chans=1)


def _deit_distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(**TINY)


def _replaced_block(block: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = tiny_vit()
        model.blocks[2] = block()
        return model

    return build


NOT_QUALIFYING = {
    "resnet": (_resnet, "it is not a timm VisionTransformer"),
    "deit_distilled": (_deit_distilled, "distillation token"),
    "narrow_block": (_replaced_block(lambda: Block(32, 2, mlp_ratio=2, qkv_bias=True)), "block 2 differs"),
    "other_heads": (_replaced_block(lambda: Block(64, 2, mlp_ratio=2, qkv_bias=True)), "block 2 differs"),
    "other_mlp": (_replaced_block(lambda: Block(64, 4, mlp_ratio=4, qkv_bias=True)), "block 2 differs"),
    "not_a_block": (_replaced_block(nn.Identity), "block 2 is a Identity, not a timm Block"),
    "relu_mlp": (lambda: tiny_vit(act_layer=nn.ReLU), "options the pool cannot rebuild"),
    "no_final_norm": (lambda: tiny_vit(final_norm=False), "options the pool cannot rebuild"),
    "no_proj_bias": (lambda: tiny_vit(proj_bias=False), "options the pool cannot rebuild"),
}


@pytest.mark.parametrize("build, why", NOT_QUALIFYING.values(), ids=NOT_QUALIFYING.keys())
def test_non_qualifying_ancestry_is_pass_error(build, why):
    model = build()
    with pytest.raises(PassError) as err:
        ancestry_shape(model)
    assert "is not a uniform stack of transformer blocks" in err.value.cause
    assert why in err.value.cause
    assert QUALIFY in err.value.fix and "timm VisionTransformer" in str(err.value)


# ----------------------------------------------------------------------------- 3. derive errors


@pytest.mark.parametrize("blocks, dim, words", [
    (4, 16, ("fewer blocks than the ancestry's 4", "--blocks in 1..3")),
    (7, 16, ("got 7", "--blocks in 1..3")),
    (0, 16, ("got 0", "--blocks in 1..3")),
    (-1, 16, ("got -1", "--blocks")),
    (2, 24, ("width 24", "--dim as a multiple of 16 up to 64")),
    (2, 8, ("width 8", "--dim as a multiple of 16")),
    (2, 128, ("width 128", "up to 64")),
    (2, 0, ("width 0", "--dim")),
])
def test_derive_errors_name_a_fix(blocks, dim, words):
    shape = ancestry_shape(tiny_vit())
    with pytest.raises(ZooError) as err:
        shape.derive(blocks, dim)
    assert err.value.fix
    text = str(err.value)
    for word in words:
        assert word in text


def test_derive_keeps_everything_else():
    shape = ancestry_shape(tiny_vit(qkv_bias=False, reg_tokens=1))
    aux = shape.derive(2, 32)
    assert replace(aux, depth=shape.depth, embed_dim=shape.embed_dim, num_heads=shape.num_heads) == shape
    assert shape.derive(3, 64) == replace(shape, depth=3)


# ----------------------------------------------------------------------------- 4. dense levels


def test_dense_levels():
    assert dense_levels(12, 6, 3) == [(4, 2), (8, 4), (12, 6)]
    assert dense_levels(12, 9, 3) == [(4, 3), (8, 6), (12, 9)]
    assert dense_levels(12, 6, 1) == [(12, 6)]
    assert dense_levels(4, 2, 2) == [(2, 1), (4, 2)]
    for levels in (0, 7):
        with pytest.raises(ValueError, match=r"levels must be in 1\.\.6"):
            dense_levels(12, 6, levels)


# ----------------------------------------------------------------------------- 5. distillation


def test_taps_capture_block_and_attention_outputs():
    model = tiny_vit(noise=0.1)
    taps = Taps(model, [1, 3])
    x = torch.randn(*X_SHAPE)
    with torch.no_grad():
        model(x)
        for b in (1, 3):
            h = prefix_out(model, x, b - 1)
            block = model.blocks[b - 1]
            attn = block.attn(block.norm1(h))
            torch.testing.assert_close(taps.attn[b], attn, atol=1e-6, rtol=0)
            torch.testing.assert_close(taps.blocks[b], block(h), atol=1e-6, rtol=0)
            # before the residual add: the block output is h + attn + mlp(…), not the attention output
            assert not torch.allclose(taps.attn[b], h + attn, atol=1e-3)
    assert set(taps.blocks) == set(taps.attn) == {1, 3}
    taps.remove()
    assert all(not blk._forward_hooks and not blk.attn._forward_hooks for blk in model.blocks)


def test_identity_transforms_when_widths_match():
    transforms = Transforms(64, 64, 3)
    assert transforms.identity and count_params(transforms) == 0
    assert torch.equal(transforms.stitch_matrix(), torch.eye(64))
    x = torch.randn(2, 17, 64)
    assert transforms.map_block(0, x) is x and transforms.map_attn(2, x) is x
    narrow = Transforms(64, 16, 2)
    assert not narrow.identity and count_params(narrow) == 2 * 2 * 64 * 16
    expected = (narrow.block[0].weight + narrow.block[1].weight) / 2
    assert narrow.stitch_matrix().shape == (16, 64)
    torch.testing.assert_close(narrow.stitch_matrix(), expected)
    # with d == d' the wide row's distiller trains the auxiliary model only
    anc = tiny_vit()
    aux = build_vit(ancestry_shape(anc).derive(2, 64))
    distiller = Distiller(anc, aux, dense_levels(4, 2, 1), alpha=0.5, tau=1.0)
    assert count_params(distiller) == count_params(aux)
    distiller.close()


def _distill_batch(mnist_train: DataSplit, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return mnist_train.x[:n], mnist_train.y[:n]


def test_distill_trains_maps_and_keeps_ancestry_frozen(mnist_train):
    anc = tiny_vit(noise=0.05)
    anc_before = state(anc)
    aux = build_vit(ancestry_shape(anc).derive(2, 16))
    aux_before = state(aux)
    levels = dense_levels(4, 2, 2)
    torch.manual_seed(5)
    initial = Transforms(64, 16, len(levels))
    torch.manual_seed(5)
    result = distill(anc, aux, subset(mnist_train, 128), levels=levels, alpha=0.5, tau=1.0, epochs=1, lr=1e-3,
                     batch_size=32, seed=0, max_steps=3)
    assert result.levels == levels and len(result.history.epochs) == 1
    transforms = result.transforms
    # the maps the run started from are the ones built after the same seed (Distiller builds them first)
    assert set(initial.state_dict()) == set(transforms.state_dict()) == {
        "block.0.weight", "block.1.weight", "attn.0.weight", "attn.1.weight"}
    assert changed(state(initial), transforms) == set(initial.state_dict())
    assert changed(aux_before, aux)  # the auxiliary model trained in place
    assert not changed(anc_before, anc)
    assert all(p.grad is None and not p.requires_grad for p in anc.parameters())
    assert not anc.training
    # the hooks are gone after the run
    assert all(not b._forward_hooks and not b.attn._forward_hooks for m in (anc, aux) for b in m.blocks)


def test_block_and_attention_losses_fall_through_the_maps(mnist_train):
    anc = tiny_vit(noise=0.05)
    aux = build_vit(ancestry_shape(anc).derive(2, 16))
    distiller = Distiller(anc, aux, dense_levels(4, 2, 2), alpha=0.5, tau=1.0)
    trainable = {id(p) for p in distiller.parameters()}
    assert trainable == {id(p) for p in aux.parameters()} | {id(p) for p in distiller.transforms.parameters()}
    assert not trainable & {id(p) for p in anc.parameters()}
    x, y = _distill_batch(mnist_train)

    def feature_loss() -> float:
        with torch.no_grad():
            _, parts = distiller.loss_parts(x, y)
        return parts.blk + parts.att

    def descend(params, lr: float) -> None:  # 30 Adam steps on the Eq. 8 loss
        optimizer = torch.optim.Adam(params, lr=lr)
        for _ in range(30):
            optimizer.zero_grad()
            total, _ = distiller.loss_parts(x, y)
            total.backward()
            optimizer.step()

    # 1. the maps alone (auxiliary model frozen) bring the ancestry's features closer to the auxiliary's
    aux.requires_grad_(False)
    before = feature_loss()
    descend(distiller.transforms.parameters(), lr=1e-2)
    maps_only = feature_loss()
    assert maps_only < 0.5 * before, (before, maps_only)
    assert all(p.grad is None for p in aux.parameters())
    assert all(p.grad is None for p in anc.parameters())
    # 2. the whole distiller (Eq. 8) lowers them further
    aux.requires_grad_(True)
    descend(distiller.parameters(), lr=3e-3)
    after = feature_loss()
    assert after < maps_only, (before, maps_only, after)
    _, parts = distiller.loss_parts(x, y)
    assert math.isclose(parts.total, 0.5 * parts.cls + 0.5 * (parts.att + parts.blk + parts.pred), rel_tol=1e-5)
    distiller.close()


# ----------------------------------------------------------------------------- 6. descendants


def test_end_paths_are_the_auxiliary_models_exactly():
    pool = make_pool()
    x = torch.randn(*X_SHAPE)
    with torch.no_grad():
        assert torch.equal(pool(x, low=pool.depth), pool.small(x))
        assert torch.equal(pool(x, 0), pool.large(x))
    for low in (0, pool.depth):
        module = pool.path_module(low)
        assert "stitch" not in dict(module.named_children())
        assert not any(isinstance(m, type(pool.stitches["1"])) for m in module.modules())
    assert count_params(pool.path_module(pool.depth)) == count_params(pool.small)
    assert count_params(pool.path_module(0)) == count_params(pool.large)


def test_stitched_paths_equal_the_manual_composition():
    pool = make_pool()
    x = torch.randn(4, 1, 28, 28)
    outputs = {}
    with torch.no_grad():
        for low in range(1, pool.depth):
            module = pool.path_module(low)
            assert list(dict(module.named_children())) == ["head", "stitch", "tail"]
            assert module.stitch is pool.stitches[str(low)]
            outputs[low] = module(x)
            torch.testing.assert_close(outputs[low], manual_descendant(pool, x, low), atol=1e-5, rtol=0)
            assert torch.equal(pool(x, low), outputs[low])
        assert outputs[1].abs().max() > 0.1  # not trivially near zero
        assert not torch.allclose(outputs[1], outputs[2], atol=1e-3)
    for low in (-1, pool.depth + 1):
        with pytest.raises(ZooError, match="no descendant"):
            pool.path_module(low)


def test_path_params_add_up_and_grow_with_the_large_part():
    pool = make_pool()
    small, large = pool.small, pool.large
    embedding = count_params(small.patch_embed) + small.cls_token.numel() + small.pos_embed.numel()
    head = count_params(large.norm) + count_params(large.head)
    params = {}
    for low in pool.lows():
        module = pool.path_module(low)
        params[low] = count_params(module)
        assert params[low] == sum(count_params(part) for part in module)
        if 0 < low < pool.depth:
            manual = (embedding + sum(count_params(b) for b in small.blocks[:low])
                      + count_params(pool.stitches[str(low)]) + sum(count_params(b) for b in large.blocks[low:]) + head)
            assert params[low] == manual
    assert pool.lows() == [3, 2, 1, 0]
    assert all(params[a] < params[b] for a, b in zip(pool.lows(), pool.lows()[1:], strict=False))
    rows = pool.descendant_rows(None, (1, 28, 28))
    assert [r["low"] for r in rows] == [3, 2, 1, 0] and [r["high"] for r in rows] == [0, 1, 2, 3]
    assert [r["params"] for r in rows] == [params[low] for low in pool.lows()]
    assert all(a["macs"] < b["macs"] for a, b in zip(rows, rows[1:], strict=False))
    storage = pool.storage()
    assert storage == {"small": count_params(small), "large": count_params(large),
                       "stitches": 2 * (16 * 64 + 64), "total": storage["total"]}
    assert storage["total"] == count_params(pool)


def test_rows_of_different_depth_are_refused():
    shape = ancestry_shape(tiny_vit())
    with pytest.raises(ZooError, match="differ in depth"):
        LearngenePool(build_vit(shape.derive(2, 16)), build_vit(shape.derive(3, 64)), example_batch((1, 28, 28)))


# ----------------------------------------------------------------------------- 7. stitch inits


def test_tm_init_is_the_matrix_transpose():
    pool = make_pool()
    matrix = torch.randn(16, 64)
    pool.init_stitches("tm", matrix=matrix)
    for low in range(1, pool.depth):
        stitch = pool.stitches[str(low)]
        assert torch.equal(stitch.proj.weight, matrix.T)
        assert torch.equal(stitch.proj.bias, torch.zeros(64))
    # with the distillation's maps: Y = X · mean(W), W the (d', d) block maps
    transforms = Transforms(64, 16, 2)
    pool.init_stitches("tm", matrix=transforms.stitch_matrix())
    x = torch.randn(3, 17, 16)
    with torch.no_grad():
        torch.testing.assert_close(pool.stitches["1"](x), x @ transforms.stitch_matrix(), atol=1e-6, rtol=0)
    with pytest.raises(ZooError, match="tm init needs"):
        pool.init_stitches("tm")
    with pytest.raises(ZooError, match="unknown stitch init"):
        pool.init_stitches("eye")


def test_ls_init_fits_better_than_random(mnist_train):
    pool = make_pool()
    probe, held_out = mnist_train.x[:128], mnist_train.x[128:192]
    pool.init_stitches("ls", probe=probe)
    ls = {low: copy.deepcopy(pool.stitches[str(low)]) for low in range(1, pool.depth)}
    pool.init_stitches("random", seed=0)
    with torch.no_grad():
        for low in range(1, pool.depth):
            for images in (probe, held_out):
                src, dst = prefix_out(pool.small, images, low), prefix_out(pool.large, images, low)
                fitted = F.mse_loss(ls[low](src), dst)
                random = F.mse_loss(pool.stitches[str(low)](src), dst)
                assert fitted < 0.5 * random, (low, float(fitted), float(random))
                # and better than the best constant (the mean destination token)
                assert fitted < F.mse_loss(dst.mean((0, 1)).expand_as(dst), dst)
    with pytest.raises(ZooError, match="probe"):
        pool.init_stitches("ls")


def test_random_init_is_seeded():
    pool = make_pool()
    pool.init_stitches("random", seed=3)
    first = state(pool.stitches)
    pool.init_stitches("random", seed=4)
    other = state(pool.stitches)
    pool.init_stitches("random", seed=3)
    assert not changed(first, pool.stitches)
    assert all(not torch.equal(first[k], other[k]) for k in first if k.endswith("weight"))


# ----------------------------------------------------------------------------- 8. ONNX export


def test_descendants_export_with_parity(tmp_path):
    pool = make_pool()
    x = torch.randn(*X_SHAPE)
    pool_ptrs = {p.data_ptr() for p in pool.parameters()}
    exported = {}
    for low in (1, pool.depth):  # a stitched descendant and the small auxiliary model
        descendant = pool.descendant(low)
        assert not pool_ptrs & {p.data_ptr() for p in descendant.parameters()}
        with torch.no_grad():
            expected = pool(x, low)
            assert torch.equal(descendant(x), expected)
        report = export_onnx(descendant, x, tmp_path / f"d{low}.onnx")
        assert report.max_abs_diff <= 1e-4, (low, report)
        assert (tmp_path / f"d{low}.onnx").stat().st_size == report.file_bytes > 0
        exported[low] = (descendant, expected)
    # standalone: changing the pool leaves the exported descendants as they were
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(1.0)
        for descendant, expected in exported.values():
            assert torch.equal(descendant(x), expected)


def _initializer_elements(path: Path) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        sizes[t.data_type] = sizes.get(t.data_type, 0) + int(np.prod(t.dims))
    return sizes


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_measure_descendants_at_a_deployment_precision(precision, tmp_path, mnist_train):
    """Each descendant's file is written at the precision asked for, timed as written, and scored on the test data
    against fp32; the fp32 export's parity stays in ``onnx_max_abs_diff``."""
    pool = make_pool()
    test = load_dataset("mnist5k", "test")
    evaluation = (test.x[:200], test.y[:200])
    rows = [{"low": 1, "high": pool.depth - 1}]
    pipeline.measure_descendants(pool, rows, tmp_path, torch.randn(*X_SHAPE), runs=2,
                                 deploy=DeployOptions(precision=precision), calibration=mnist_train.x[:128],
                                 evaluation=evaluation)
    row, path = rows[0], tmp_path / "low1_high2.onnx"
    written = row["deploy"]
    assert (row["precision"], written["precision"]) == (precision, precision)
    assert row["onnx_max_abs_diff"] <= 1e-4 and row["latency_ms"] > 0
    assert written["file_bytes"] == path.stat().st_size
    sizes = _initializer_elements(path)
    if precision == "fp16":  # fp16 weights (LayerNorm's scale and bias stay fp32), parity within fp16's tolerance
        assert sizes[onnx.TensorProto.FLOAT16] > 0.9 * sum(sizes.values())
        assert written["max_abs_diff"] <= written["tolerance"]
    else:  # QDQ: int8 weights, calibrated activations
        assert sizes[onnx.TensorProto.INT8] > 0.5 * sum(sizes.values())
        assert written["notes"]["quantize_nodes"] > 0 and written["tolerance"] is None
    with torch.no_grad():
        torch_accuracy = float((pool.descendant(1)(evaluation[0]).argmax(1) == evaluation[1]).float().mean())
    assert written["accuracy_change"] == pytest.approx(written["accuracy"] - torch_accuracy, abs=0.011)


# ----------------------------------------------------------------------------- 9. fine-tuning


@pytest.mark.parametrize("with_ancestry", [True, False], ids=["kd", "no_ancestry"])
def test_finetune_trains_sampled_paths_only(with_ancestry, mnist_train):
    pool = make_pool()
    ancestry = tiny_vit(noise=0.05) if with_ancestry else None
    anc_before = state(ancestry) if ancestry is not None else None
    before = state(pool)
    history, counts = finetune(pool, subset(mnist_train, 256), ancestry=ancestry, epochs=1, lr=1e-3, batch_size=16,
                               seed=0, max_steps=12)
    assert sum(counts) == 12 and len(counts) == pool.depth + 1
    assert sum(c > 0 for c in counts) >= 3, counts
    assert all(math.isfinite(e.loss) for e in history.epochs)
    moved = changed(before, pool)
    for low in range(1, pool.depth):
        stitch_moved = any(k.startswith(f"stitches.{low}.") for k in moved)
        assert stitch_moved == (counts[low] > 0), (low, counts)
    # the small row's classifier is only on path low = l, the large row's embedding only on low = 0
    assert any(k.startswith("small.head.") for k in moved) == (counts[pool.depth] > 0)
    assert any(k.startswith("large.patch_embed.") for k in moved) == (counts[0] > 0)
    assert any(k.startswith("small.blocks.0.") for k in moved) and any(k.startswith("large.blocks.2.") for k in moved)
    if ancestry is not None:
        assert not changed(anc_before, ancestry)
        assert all(p.grad is None for p in ancestry.parameters())


def test_kd_changes_the_fine_tuning(mnist_train):
    """The ancestry's soft targets take part: the same steps from the same pool differ with and without them."""
    tuned = {}
    for name, ancestry in (("kd", tiny_vit(noise=0.05)), ("ce", None)):
        pool = make_pool()
        finetune(pool, subset(mnist_train, 128), ancestry=ancestry, epochs=1, lr=1e-3, batch_size=16, seed=0,
                 max_steps=4)
        tuned[name] = state(pool)
    assert any(not torch.equal(tuned["kd"][k], tuned["ce"][k]) for k in tuned["kd"])


# ----------------------------------------------------------------------------- 10. the pool directory


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> tuple[Path, dict]:
    """One pool distilled by the pipeline from a fixed tiny ancestry checkpoint (1 epoch on mnist5k)."""
    root = tmp_path_factory.mktemp("pool")
    torch.manual_seed(0)
    ancestry = load_model(SPEC)
    torch.save(ancestry.state_dict(), root / "ancestry.pt")
    config = PoolDistillConfig(spec=SPEC, checkpoint=str(root / "ancestry.pt"), blocks=2, dim=16, levels=2,
                               epochs=1, init="tm", progress=False)
    doc = pipeline.distill_pool(config, root / "pool")
    return root / "pool", doc


def test_distilled_pool_directory(distilled):
    directory, doc = distilled
    assert sorted(p.name for p in directory.iterdir()) == [store.INSTANCES_FILE, store.POOL_FILE,
                                                          store.TRANSFORMS_FILE]
    on_disk = json.loads((directory / store.POOL_FILE).read_text())
    assert on_disk["format"] == store.POOL_FORMAT == doc["format"]
    assert on_disk["levels"] == {"large": [[2, 1], [4, 2]], "small": [[2, 1], [4, 2]]}  # both default to 2 levels
    assert (on_disk["rows"]["small"]["embed_dim"], on_disk["rows"]["small"]["num_heads"]) == (16, 1)
    assert (on_disk["rows"]["large"]["embed_dim"], on_disk["rows"]["large"]["depth"]) == (64, 2)
    source = store.read_pool(directory)
    pool = source.load_pool()
    assert [r["low"] for r in on_disk["descendants"]] == [2, 1, 0]
    test = load_dataset("mnist5k", "test")
    for row in on_disk["descendants"]:
        module = pool.path_module(row["low"]).eval()
        assert row["params"] == count_params(module)
        assert row["accuracy"] == pytest.approx(evaluate(module, test), abs=1e-9)
    assert on_disk["storage"] == pool.storage()
    # tm init and no fine-tuning yet: each stitch is the transpose of the mean block map, zero bias
    matrix = source.load_transforms().stitch_matrix()
    assert torch.equal(pool.stitches["1"].proj.weight, matrix.T)
    assert not pool.stitches["1"].proj.bias.any()
    listed = pipeline.list_pool(directory)
    assert listed["descendants"] == on_disk["descendants"] and listed["format"] == store.POOL_FORMAT


def test_store_round_trip_reproduces_outputs(distilled, tmp_path):
    directory, _ = distilled
    source = store.read_pool(directory)
    rows = source.rows
    torch.manual_seed(1)
    pool = LearngenePool(noisy(build_vit(rows["small"]), 1), noisy(build_vit(rows["large"]), 2),
                         example_batch(source.input_shape)).eval()
    transforms = Transforms(64, 16, 2)
    pool.init_stitches("tm", matrix=transforms.stitch_matrix())
    doc = json.loads((directory / store.POOL_FILE).read_text())
    doc["weights"] = store.write_weights(tmp_path, pool, transforms)
    (tmp_path / store.POOL_FILE).write_text(json.dumps(doc))
    loaded = store.read_pool(tmp_path)
    again = loaded.load_pool()
    assert not again.training
    x = torch.randn(*X_SHAPE)
    with torch.no_grad():
        for low in pool.lows():
            assert torch.equal(again(x, low), pool(x, low))
    assert not changed(state(transforms), loaded.load_transforms())
    # the same pool read twice gives identical descendants
    first, second = store.read_pool(directory).load_pool(), store.read_pool(directory).load_pool()
    with torch.no_grad():
        assert torch.equal(first(x, 1), second(x, 1))


def _copy_pool(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def test_distillation_is_deterministic(distilled, tmp_path):
    """The same config and seed write byte-identical weights (results do not depend on the run)."""
    directory, doc = distilled
    config = PoolDistillConfig(spec=SPEC, checkpoint=doc["ancestry"]["checkpoint"], blocks=2, dim=16, levels=2,
                               epochs=1, init="tm", progress=False)
    again = pipeline.distill_pool(config, tmp_path / "again")
    assert again["weights"] == doc["weights"]
    for name in (store.INSTANCES_FILE, store.TRANSFORMS_FILE):
        assert (tmp_path / "again" / name).read_bytes() == (directory / name).read_bytes()


def _edit(path: Path, where: tuple[str, ...], value) -> None:
    doc = json.loads(path.read_text())
    node = doc
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    path.write_text(json.dumps(doc))


BAD_VALUES = {  # pool.json values of the right JSON type that would crash a rebuild, or data the code reads
    "zero heads": (("rows", "small", "num_heads"), 0, "rows.small.num_heads must be an integer >= 1"),
    "partial heads": (("rows", "large", "num_heads"), 5, "rows.large must be a shape whose width divides"),
    "unknown pooling": (("rows", "small", "global_pool"), "bogus", "rows.small.global_pool must be \"token\" or"),
    "zero depth": (("ancestry", "shape", "depth"), 0, "ancestry.shape.depth must be an integer >= 1"),
    "checkpoint": (("ancestry", "checkpoint"), 5, "ancestry.checkpoint must be"),
    "finetune": (("finetune",), "yes", "finetune must be null, or an object"),
    "storage": (("storage",), {"total": 1}, "storage.small must be"),
    "rows differ": (("rows", "small", "depth"), 1, "rows.small must be rows.large at a narrower width"),
    "rows swapped": (("rows", "small", "embed_dim"), 64, "rows.small must be"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_in_pool_json_are_refused(case, distilled, tmp_path):
    target = _copy_pool(distilled[0], tmp_path)
    where, value, words = BAD_VALUES[case]
    _edit(target / store.POOL_FILE, where, value)
    with pytest.raises(CheckpointError) as err:
        store.read_pool(target)
    assert words in str(err.value), str(err.value)


def test_distill_preflight_creates_nothing(distilled, tmp_path):
    """A bad option is refused before the output's parent directories are created."""
    config = PoolDistillConfig(spec=SPEC, checkpoint=distilled[1]["ancestry"]["checkpoint"], blocks=4, epochs=1,
                               progress=False)
    with pytest.raises(ZooError, match="fewer blocks"):
        pipeline.distill_pool(config, tmp_path / "a" / "b" / "pool")
    assert list(tmp_path.iterdir()) == []


def test_foreign_format_is_refused(distilled, tmp_path):
    target = _copy_pool(distilled[0], tmp_path)
    doc = json.loads((target / store.POOL_FILE).read_text())
    doc["format"] = "zoocompiler.learngene-pool/0"
    (target / store.POOL_FILE).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as err:
        store.read_pool(target)
    assert "format" in str(err.value) and store.POOL_FORMAT in str(err.value)


def test_tampered_weights_are_refused(distilled, tmp_path):
    target = _copy_pool(distilled[0], tmp_path)
    source = store.read_pool(target)  # the file is only checked when its weights are loaded
    data = bytearray((target / store.INSTANCES_FILE).read_bytes())
    data[-1] ^= 0xFF
    (target / store.INSTANCES_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        source.load_pool()
    source.load_transforms()  # the other file is intact
    (target / store.TRANSFORMS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        source.load_transforms()
    with pytest.raises(CheckpointError, match="does not exist"):
        store.read_pool(tmp_path / "nowhere")


ROWS = [
    {"low": 2, "high": 0, "params": 100, "macs": 1_000, "latency_ms": 1.0, "accuracy": 0.5},
    {"low": 1, "high": 1, "params": 200, "macs": 2_000, "latency_ms": 2.0, "accuracy": 0.7},
    {"low": 0, "high": 2, "params": 300, "macs": 3_000, "latency_ms": 3.0, "accuracy": 0.7},
]


def test_pick_descendant():
    assert pipeline.pick_descendant(ROWS, Budget())["low"] == 1  # accuracy tie: fewer params
    assert pipeline.pick_descendant(ROWS, Budget(params=150))["low"] == 2
    assert pipeline.pick_descendant(ROWS, Budget(macs=2_000))["low"] == 1
    assert pipeline.pick_descendant(ROWS, Budget(latency_ms=1.5))["low"] == 2
    better = [*ROWS[:2], {**ROWS[2], "accuracy": 0.9}]
    assert pipeline.pick_descendant(better, Budget.parse("params=1k"))["low"] == 0
    assert pipeline.pick_descendant(better, Budget(params=300, macs=2_500))["low"] == 1
    with pytest.raises(BudgetError) as err:
        pipeline.pick_descendant(ROWS, Budget(params=50))
    assert "the smallest (low=2, high=0) has params=" in err.value.cause
    assert "flops=1k" in err.value.cause and "latency=1ms" in err.value.cause
    assert err.value.fix and "raise the budget to at least params=" in err.value.fix
    odd = [{**row, "params": row["params"] + 23} for row in ROWS]
    with pytest.raises(BudgetError, match=r"\(low=2, high=0\) has params=123, flops=1k, latency=1ms"):
        pipeline.pick_descendant(odd, Budget(params=50, macs=10_000))


def test_budget_error_names_round_numbers():
    with pytest.raises(BudgetError) as err:
        pipeline.pick_descendant(ROWS, Budget(params=50))
    assert "has params=100," in err.value.cause


# ----------------------------------------------------------------------------- 11. stack boundaries


def test_stack_boundaries_cut_the_timm_blocks():
    model = tiny_vit(noise=0.1)
    gm = trace(model, torch.zeros(*X_SHAPE))
    bounds = stack_boundaries(gm, "blocks", 4)
    assert len(bounds) == 5 and all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1] < len(graph_info(gm).cut_points) - 1  # the head follows the stack
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        h = embed_tokens(model, x)
        torch.testing.assert_close(extract_block(gm, 0, bounds[0]).module(x), h, atol=1e-6, rtol=0)
        for k, block in enumerate(model.blocks):
            cut = extract_block(gm, bounds[k], bounds[k + 1]).module
            expected = block(h)
            torch.testing.assert_close(cut(h), expected, atol=1e-5, rtol=0)
            h = expected
        last = len(graph_info(gm).cut_points) - 1
        tail = extract_block(gm, bounds[-1], last).module
        torch.testing.assert_close(tail(h), model.forward_head(model.norm(h)), atol=1e-5, rtol=0)
    with pytest.raises(PassError, match="the output of block blocks.4 is not a cut point"):
        stack_boundaries(gm, "blocks", 5)


# ----------------------------------------------------------------------------- the demo ancestry (slow)


@pytest.mark.slow
def test_demo_ancestry_pool_end_to_end(tmp_path):
    """zoo:vit_anc12 (12 blocks at d=192) → pool(6) at d'=48 (1 epoch): 14 instances, 7 descendants from 117 k
    params up, the ends equal to the auxiliary models, a stitched descendant exported with parity."""
    doc = pipeline.distill_pool(PoolDistillConfig(epochs=1, progress=False), tmp_path / "pool")
    assert (doc["rows"]["small"]["embed_dim"], doc["rows"]["small"]["num_heads"], doc["rows"]["small"]["depth"]) \
        == (48, 3, 6)
    assert doc["levels"] == {"large": [[4, 2], [8, 4], [12, 6]], "small": [[4, 2], [8, 4], [12, 6]]}
    rows = doc["descendants"]
    assert [r["low"] for r in rows] == [6, 5, 4, 3, 2, 1, 0]
    assert rows[0]["params"] == doc["storage"]["small"] and rows[-1]["params"] == doc["storage"]["large"]
    assert all(a["params"] < b["params"] for a, b in zip(rows, rows[1:], strict=False))
    pool = store.read_pool(tmp_path / "pool").load_pool()
    report = export_onnx(pool.descendant(3), torch.randn(2, 1, 28, 28), tmp_path / "d3.onnx")
    assert report.max_abs_diff <= 1e-4


@pytest.mark.slow
def test_bench_quick_runs(tmp_path):
    """`bench/pool.py --quick` runs end to end and writes its JSON (targets included) and plot."""
    from helpers.bench import run_quick_bench

    doc = run_quick_bench("pool", tmp_path)
    assert set(doc["depths"]) == {"6"} and len(doc["targets"]) == 4
