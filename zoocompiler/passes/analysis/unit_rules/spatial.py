"""Pooling, interpolation, padding and roll: units carry over dims the op does not mix, else pinned."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .context import Cx, RuleFailure, norm_dim
from .coupling import taint_all
from .registry import function_rule, module_rule
from .states import ParamRef, Table


def spatial_carry(cx: Cx, n_spatial: int | None) -> Any:
    """Pooling/interpolation/padding over the trailing ``n_spatial`` dims carry units elsewhere.

    ``n_spatial`` None: only the dims whose size changes are mixed.
    """
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    b = cx.out_shape
    if not isinstance(s, Table):
        if isinstance(s, ParamRef):
            taint_all(cx, s, f"resampled by {cx.where()}")
        return None
    if len(a) != len(b):
        raise RuleFailure("spatial op changes rank")
    changed = {d for d in range(len(a)) if a[d] != b[d]}
    if n_spatial is not None:
        changed |= set(range(len(a) - n_spatial, len(a)))
    hit = [d for d in s.dims if d in changed]
    if hit:
        cx.store.pin(s.ids, f"{cx.where()} mixes positions along unit dim {hit[0]}")
        return None
    return s


def spatial_rank(name: str) -> int | None:
    """1, 2 or 3 for a name ending in ``1d``/``2d``/``3d``, else None."""
    for k in (1, 2, 3):
        if name.endswith(f"{k}d"):
            return k
    return None


@function_rule(
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
    "max_pool2d", "max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample",
    "upsample_nearest2d", "upsample_bilinear2d", "max_pool2d_with_indices", "_adaptive_avg_pool2d",
    "adaptive_max_pool2d_with_indices",
)
def rule_spatial(cx: Cx) -> Any:
    return spatial_carry(cx, spatial_rank(cx.op))


@function_rule("pad", "constant_pad_nd")
def rule_pad(cx: Cx) -> Any:
    return spatial_carry(cx, None)


@function_rule("roll")
def rule_roll(cx: Cx) -> Any:
    """Rolling along a unit dim moves units between positions: pinned."""
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    dims = cx.val(cx.arg(1 if cx.node.op == "call_method" else 2, "dims"))
    dims = list(range(len(a))) if dims is None or dims == () else ([dims] if isinstance(dims, int) else list(dims))
    dims = [norm_dim(d, len(a)) for d in dims]
    if isinstance(s, Table) and any(d in s.dims for d in dims):
        cx.store.pin(s.ids, f"{cx.where()} rolls along a unit dim")
        return None
    return s if isinstance(s, Table) else None


@module_rule(
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
def _pool_module(cx: Cx, m: nn.Module) -> Any:
    return spatial_carry(cx, spatial_rank(type(m).__name__.lower().replace("same", "")))


def _torch_padding_classes() -> list[type]:
    mod = nn.modules.padding
    return [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__]


@module_rule(nn.Upsample)
def _resample_module(cx: Cx, m: nn.Module) -> Any:
    return spatial_carry(cx, None)


module_rule(*_torch_padding_classes(), exact=True)(_resample_module)
