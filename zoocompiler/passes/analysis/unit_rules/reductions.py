"""Reductions and normalisations: over a unit dim they couple all its units (pinned, or with
``layernorm_streams="prune"`` statistics over the kept units for mean/sum/var/std); elsewhere units carry."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .context import Cx, RuleFailure, norm_dim
from .coupling import taint_all
from .elementwise import rule_pointwise
from .registry import function_rule, module_rule
from .states import APPROX_LAYERNORM, ParamRef, Table, TensorSpec
from .tables import table_or_none


def _reduce_dims(ndim: int, dim_arg: Any) -> list[int]:
    if dim_arg is None:
        return list(range(ndim))
    dims = [dim_arg] if isinstance(dim_arg, int) else list(dim_arg)
    return [norm_dim(int(d), ndim) for d in dims] if dims else list(range(ndim))


STATISTICS = ("mean", "sum", "var", "std", "var_mean", "std_mean")  # pruned: computed over the kept units


@function_rule(
    "mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod", "all", "any", "argmax",
    "argmin", "nansum", "nanmean", "var_mean", "std_mean", "median", "linalg_vector_norm",
)
def rule_reduce(cx: Cx) -> Any:
    """mean/sum/amax/var/...: reducing a unit dim couples all its units; others carry.

    The coupled units are pinned, except for :data:`STATISTICS` when ``cx.prunes_streams``:
    those are marked :data:`~.states.APPROX_LAYERNORM` (the pruned model reduces over the kept units;
    the masked reference does the same, :mod:`zoocompiler.passes.rewrite.masked_stats`).
    """
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    is_method = cx.node.op == "call_method"
    skip = 1 if cx.op in ("norm", "linalg_vector_norm") else 0  # norm(x, p, dim)
    dim_arg = cx.val(cx.arg((0 if is_method else 1) + skip, "dim"))
    if isinstance(dim_arg, torch.dtype):
        dim_arg = None
    if cx.op in ("max", "min") and isinstance(dim_arg, TensorSpec):
        return rule_pointwise(cx)  # max(a, b)
    dims = _reduce_dims(len(a), dim_arg)
    first = cx.out[0] if isinstance(cx.out, (list, tuple)) else cx.out
    keepdim = isinstance(first, TensorSpec) and len(first.shape) == len(a)
    result: Any = None
    if isinstance(s, Table):
        hit = [d for d in s.dims if d in dims]
        if hit and cx.prunes_streams and cx.op in STATISTICS:
            cx.store.mark_approx(s.ids, APPROX_LAYERNORM)
        elif hit:
            cx.store.pin(s.ids, f"{cx.where()} reduces over unit dim {hit[0]} (all its units are coupled)")
        ids, new_dims = s.ids, []
        for ax, d in reversed(list(enumerate(s.dims))):
            if d in dims:
                ids = ids.take(0, axis=ax)
        for d in s.dims:
            if d not in dims:
                new_dims.append(d if keepdim else d - sum(1 for r in dims if r < d))
        result = table_or_none(new_dims, ids)
    elif isinstance(s, ParamRef):
        taint_all(cx, s, f"reduced by {cx.where()}")
    if isinstance(cx.out, (list, tuple)):
        return [result] + [result if isinstance(cx.out[i], TensorSpec) else None for i in range(1, len(cx.out))]
    return result


@function_rule("softmax", "log_softmax", "softmin", "_softmax", "_log_softmax")
def rule_softmax(cx: Cx) -> Any:
    """Softmax over a unit dim pins it; the units carry either way."""
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    if cx.node.op == "call_module":
        dim = getattr(cx.gm.get_submodule(cx.node.target), "dim", None)
        dim = -3 if type(cx.gm.get_submodule(cx.node.target)).__name__ == "Softmax2d" else dim
    else:
        dim = cx.val(cx.arg(0 if cx.node.op == "call_method" else 1, "dim"))
    if dim is None:
        raise RuleFailure("softmax without dim")
    d = norm_dim(int(dim), len(a))
    if isinstance(s, Table) and d in s.dims and a[d] > 1:
        cx.store.pin(s.ids, f"{cx.where()} normalises over unit dim {d} (all its units are coupled)")
    taint_all(cx, s, f"normalised by {cx.where()}")
    return s if isinstance(s, Table) else None


@module_rule(nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)
def _softmax_module(cx: Cx, m: nn.Module) -> Any:
    return rule_softmax(cx)


@function_rule("normalize")
def rule_normalize(cx: Cx) -> Any:
    """``F.normalize`` over a unit dim pins it; the units carry either way."""
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    d = norm_dim(int(cx.val(cx.arg(2, "dim", 1))), len(a))
    if isinstance(s, Table) and d in s.dims:
        cx.store.pin(s.ids, f"{cx.where()} normalises over unit dim {d} (all its units are coupled)")
    return s if isinstance(s, Table) else None
