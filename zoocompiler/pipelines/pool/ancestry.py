"""Ancestry models and the auxiliary models derived from their own configuration (Learngene Pool, Eq. 1-2).

An ancestry qualifies when it is a timm ``VisionTransformer`` (ViT, DeiT without a distillation token)
whose blocks are all timm ``Block`` modules of one width, head count and MLP width: a uniform stack.
:func:`ancestry_shape` reads that configuration back from the module (no hand-written model classes),
:meth:`VitShape.derive` narrows it to ``l`` blocks at width ``d'`` (the head width is kept, so ``d'``
must be a whole number of heads), and :func:`build_vit` builds a fresh timm model from a shape. Shapes
are plain data: a pool directory stores them as JSON and rebuilds its instances from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from timm.layers import LayerScale
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from zoocompiler.core.errors import PassError, ZooError

QUALIFY = ("timm VisionTransformer models (ViT, DeiT without a distillation token) whose blocks all have one "
           "width, head count and MLP width, e.g. zoo:vit_anc12 or timm:deit_base_patch16_224")


@dataclass(frozen=True)
class VitShape:
    """The constructor options of a timm ``VisionTransformer`` that a pool instance depends on."""

    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    num_classes: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool = True
    qk_norm: bool = False
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    global_pool: str = "token"
    pre_norm: bool = False
    fc_norm: bool = False
    init_values: float | None = None

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def derive(self, blocks: int, dim: int) -> VitShape:
        """The auxiliary shape with ``blocks`` blocks at width ``dim`` (heads of the ancestry's width).

        Raises ``ZooError`` unless ``1 <= blocks < depth`` and ``dim`` is a positive multiple of the
        head width no larger than the ancestry's.
        """
        if not 1 <= blocks < self.depth:
            raise ZooError(f"an auxiliary model needs fewer blocks than the ancestry's {self.depth}, got {blocks}",
                           f"pass --blocks in 1..{self.depth - 1} (the paper: {self.depth // 2} or "
                           f"{3 * self.depth // 4})")
        if not (0 < dim <= self.embed_dim and dim % self.head_dim == 0):
            raise ZooError(f"width {dim} does not divide into whole heads of {self.head_dim} (the ancestry's head "
                           f"width) up to its {self.embed_dim}",
                           f"pass --dim as a multiple of {self.head_dim} up to {self.embed_dim}, "
                           f"e.g. {max(self.head_dim, self.embed_dim // 4 // self.head_dim * self.head_dim)}")
        return replace(self.at_width(dim), depth=blocks)

    def at_width(self, dim: int) -> VitShape:
        """This shape at width ``dim`` with heads of this head width (unchecked: see :meth:`derive`)."""
        return replace(self, embed_dim=dim, num_heads=max(1, dim // self.head_dim))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (tuples as lists; ``init_values`` only when set)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> VitShape:
        """The shape a pool file records (validated by the file's schema before this is called)."""
        values = dict(doc)
        for key in ("img_size", "patch_size"):
            values[key] = tuple(int(v) for v in values[key])
        return cls(**values)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _ratio(hidden: int, embed: int) -> float:
    """The ``mlp_ratio`` timm turns back into ``hidden`` (it takes ``int(embed * ratio)``, which a float ratio
    can land just below)."""
    ratio = hidden / embed
    return ratio if int(embed * ratio) == hidden else (hidden + 0.5) / embed


def _not_uniform(model: nn.Module, why: str) -> PassError:
    return PassError(f"{type(model).__name__} is not a uniform stack of transformer blocks: {why}",
                     f"use an ancestry that qualifies: {QUALIFY}")


def ancestry_shape(model: nn.Module) -> VitShape:
    """The shape of ``model``; ``PassError`` naming what qualifies when it is not a uniform block stack."""
    if type(model) is not VisionTransformer:
        why = ("it is not a timm VisionTransformer" if not isinstance(model, VisionTransformer)
               else "a subclass of VisionTransformer adds parts (e.g. a distillation token) the pool does not rebuild")
        raise _not_uniform(model, why)
    blocks = list(model.blocks)
    if not blocks:
        raise _not_uniform(model, "it has no blocks")
    first = blocks[0]
    for i, block in enumerate(blocks):
        if type(block) is not Block:
            raise _not_uniform(model, f"block {i} is a {type(block).__name__}, not a timm Block")
        signature = (block.attn.qkv.in_features, block.attn.num_heads, block.mlp.fc1.out_features)
        if signature != (first.attn.qkv.in_features, first.attn.num_heads, first.mlp.fc1.out_features):
            raise _not_uniform(model, f"block {i} differs from block 0 in width, heads or MLP width")
    embed = int(model.embed_dim)
    shape = VitShape(
        img_size=_pair(model.patch_embed.img_size),
        patch_size=_pair(model.patch_embed.patch_size),
        in_chans=int(model.patch_embed.proj.in_channels),
        num_classes=int(model.num_classes),
        embed_dim=embed,
        depth=len(blocks),
        num_heads=int(first.attn.num_heads),
        mlp_ratio=_ratio(first.mlp.fc1.out_features, embed),
        qkv_bias=first.attn.qkv.bias is not None,
        qk_norm=not isinstance(first.attn.q_norm, nn.Identity),
        class_token=model.cls_token is not None,
        reg_tokens=int(model.num_reg_tokens),
        no_embed_class=bool(model.no_embed_class),
        global_pool=str(model.global_pool),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        init_values=1e-5 if isinstance(first.ls1, LayerScale) else None,
    )
    _check_rebuilds(model, shape)
    return shape


def _check_rebuilds(model: nn.Module, shape: VitShape) -> None:
    """``PassError`` unless ``build_vit(shape)`` has ``model``'s module types, state keys and tensor shapes: an
    option the shape does not record (an MLP variant, another activation, no final norm, ...) would otherwise
    give auxiliary models of a different architecture."""
    rebuilt = build_vit(shape)
    ours = [(name, type(m)) for name, m in model.named_modules()]
    theirs = [(name, type(m)) for name, m in rebuilt.named_modules()]
    if ours != theirs:
        where = next((a for a, b in zip(ours, theirs, strict=False) if a != b), ours[-1] if ours else None)
        raise _not_uniform(model, f"it uses options the pool cannot rebuild (module {where[0] if where else '?'} "
                                  f"differs from a VisionTransformer of the recorded shape)")
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != found:
        key = sorted(set(expected.items()) ^ set(found.items()))[0][0]
        raise _not_uniform(model, f"it uses options the pool cannot rebuild (parameter {key} differs from a "
                                  "VisionTransformer of the recorded shape)")


def build_vit(shape: VitShape) -> VisionTransformer:
    """A randomly initialised timm ``VisionTransformer`` of ``shape`` (eval mode)."""
    return VisionTransformer(**asdict(shape)).eval()
