"""Shape ops: reshape/view/flatten, expand/repeat, permute/transpose, channel shuffle, shape reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn as nn

from .context import Cx, RuleFailure, norm_dim
from .coupling import unknown
from .registry import function_rule, module_rule
from .states import ParamRef, ShapeDeps, Table, TensorSpec
from .tables import permute_state, reshape_paramref, reshape_table


@function_rule(
    "reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "_unsafe_view",
    "_reshape_alias", "ravel",
)
def rule_reshape(cx: Cx) -> Any:
    """Element ids follow their positions through the reshape (see :func:`~.tables.reshape_table`).

    Target sizes read from unit counts (``reshape(B, N, C)`` with ``C = x.shape[-1]``) need no coupling:
    the prune pass sets every batch-independent size from the expected shapes (:mod:`..prune_args`).
    """
    x = cx.this()
    s, a, b = cx.st(x), cx.shape(x), cx.out_shape
    if isinstance(s, Table):
        return reshape_table(cx, s, a, b)
    if isinstance(s, ParamRef):
        return reshape_paramref(s, a, b)
    return None


@module_rule(nn.Flatten, nn.Unflatten)
def _reshape_module(cx: Cx, m: nn.Module) -> Any:
    return rule_reshape(cx)


@function_rule("expand", "expand_as", "broadcast_to")
def rule_expand(cx: Cx) -> Any:
    """Units carry; expanding a size-1 unit dim broadcasts one unit over many positions: pinned."""
    x = cx.this()
    s, a, b = cx.st(x), cx.shape(x), cx.out_shape
    off = len(b) - len(a)
    if isinstance(s, Table):
        for d in s.dims:
            if a[d] != b[d + off]:
                cx.store.pin(s.ids, f"{cx.where()} broadcasts a single unit over dim {d + off}")
                raise RuleFailure("expand of a unit dim")
        return Table(tuple(d + off for d in s.dims), s.ids)
    if isinstance(s, ParamRef):
        return ParamRef(
            tuple(
                (n, tuple(-1 if d < off or a[d - off] != b[d] else m[d - off] for d in range(len(b))))
                for n, m in s.sources
            )
        )
    return None


@function_rule("repeat")
def rule_repeat(cx: Cx) -> Any:
    """Ids are tiled along repeated unit dims (a unit then spans every repetition)."""
    x = cx.this()
    s, a, b = cx.st(x), cx.shape(x), cx.out_shape
    if len(a) != len(b):
        raise RuleFailure("repeat adds dims")
    reps = [b[d] // a[d] for d in range(len(a))]
    if isinstance(s, Table):
        return Table(s.dims, np.tile(s.ids, [reps[d] for d in s.dims]))
    if isinstance(s, ParamRef):
        return ParamRef(
            tuple(
                (n, tuple(m[d] if reps[d] == 1 else (-1 if a[d] == 1 else None) for d in range(len(a))))
                for n, m in s.sources
            )
        )
    return None


def _perm_from_args(cx: Cx, ndim: int) -> list[int]:
    name = cx.op
    if name == "permute":
        dims = cx.val(cx.arg(1, "dims")) if cx.node.op != "call_method" else cx.val(list(cx.node.args[1:]))
        if cx.node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return [norm_dim(int(d), ndim) for d in dims]
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = (
            (cx.val(cx.arg(0, "dim0")), cx.val(cx.arg(1, "dim1")))
            if cx.node.op == "call_method"
            else (cx.val(cx.arg(1, "dim0")), cx.val(cx.arg(2, "dim1")))
        )
        perm = list(range(ndim))
        d0, d1 = norm_dim(d0, ndim), norm_dim(d1, ndim)
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if name in ("t", "numpy_T") or name == "T":
        return list(range(ndim))[::-1]
    if name in ("movedim", "moveaxis"):
        src, dst = (
            (cx.arg(0, "source"), cx.arg(1, "destination"))
            if cx.node.op == "call_method"
            else (cx.arg(1, "source"), cx.arg(2, "destination"))
        )
        src, dst = cx.val(src), cx.val(dst)
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [norm_dim(d, ndim) for d in src], [norm_dim(d, ndim) for d in dst]
        rest = [d for d in range(ndim) if d not in src]
        perm = [-1] * ndim
        for s_, d_ in zip(src, dst):
            perm[d_] = s_
        it = iter(rest)
        return [p if p >= 0 else next(it) for p in perm]
    raise RuleFailure(f"no permutation for {name}")


@function_rule("permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis", "numpy_T")
def rule_permute(cx: Cx) -> Any:
    """Unit dims are remapped."""
    x = cx.this()
    return permute_state(cx.st(x), _perm_from_args(cx, len(cx.shape(x))))


@function_rule("channel_shuffle", "native_channel_shuffle")
def rule_channel_shuffle(cx: Cx) -> Any:
    """A permutation of channel ids; position ``j`` of every shuffle group is one unit (it depends on C)."""
    x = cx.this()
    s = cx.st(x)
    if cx.node.op == "call_module":
        groups = cx.gm.get_submodule(cx.node.target).groups
    else:
        groups = int(cx.val(cx.arg(1, "groups")))
    if not isinstance(s, Table):
        return None
    if s.dims != (1,):
        raise RuleFailure("channel shuffle with units off the channel dim")
    # The shuffle permutation depends on C: keep it valid by pruning the same position in every group.
    grid = s.ids.reshape(groups, -1)
    cx.store.union_along(grid, (1,))
    return Table((1,), grid.T.reshape(-1).copy())


@module_rule(nn.ChannelShuffle)
def _channel_shuffle_module(cx: Cx, m: nn.Module) -> Any:
    return rule_channel_shuffle(cx)


@function_rule("size", "numel", "dim")
def rule_shape_read(cx: Cx) -> Any:
    """x.shape / x.size(d) / numel / dim: a Python value that depends on the read dims' unit counts."""
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    if cx.op == "dim" or a is None:
        return None
    per_dim = tuple((s.ids,) if isinstance(s, Table) and d in s.dims else () for d in range(len(a)))
    every = tuple(i for d in per_dim for i in d)
    if cx.op == "size":
        dim = cx.val(cx.arg(0 if cx.node.op == "call_method" else 1, "dim"))
        if dim is not None:
            ids = per_dim[norm_dim(int(dim), len(a))]
            return ShapeDeps(ids) if ids else None
        return ShapeDeps(every, per_dim)
    if cx.op == "getattr":
        return ShapeDeps(every, per_dim)
    return ShapeDeps(every) if every else None


@function_rule("getattr")
def rule_getattr(cx: Cx) -> Any:
    """``x.T`` / ``x.mT`` permute, ``x.shape`` is a shape read, other tensor attributes are unknown."""
    attr = cx.node.args[1]
    if isinstance(cx.out, TensorSpec):
        if attr in ("T", "mT"):
            nd = len(cx.out.shape)
            perm = list(range(nd))[::-1] if attr == "T" else list(range(nd - 2)) + [nd - 1, nd - 2]
            return permute_state(cx.st(cx.node.args[0]), perm)
        return unknown(cx)
    if attr != "shape":  # dtype, device, ndim, ...: no units
        return None
    return rule_shape_read(cx)
