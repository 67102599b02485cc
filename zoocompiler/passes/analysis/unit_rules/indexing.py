"""Indexing, slicing, split/chunk/unbind and cat/stack: tables are sliced or concatenated along unit dims."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .context import Cx, RuleFailure, norm_dim
from .coupling import couple, merge_shape_deps, operand_array, record_param, taint_all
from .registry import function_rule
from .states import ParamRef, ShapeDeps, Table, TensorSpec
from .tables import drop_dim_state, table_or_none, unsqueezed


@function_rule("getitem")
def rule_getitem(cx: Cx) -> Any:
    """``x[idx]``, an item of a multi-output op, or an entry of a shape."""
    src, idx = cx.node.args[0], cx.node.args[1]
    s = cx.st(src)
    if isinstance(s, list):  # item of a multi-output op
        return s[cx.val(idx)] if isinstance(cx.val(idx), int) else None
    if isinstance(s, ShapeDeps):
        i = cx.val(idx)
        if s.per_dim is not None and isinstance(i, int):
            return ShapeDeps(s.per_dim[i]) if s.per_dim[i] else None
        if s.per_dim is not None and isinstance(i, slice):
            return merge_shape_deps([ShapeDeps(d) for d in s.per_dim[i]])
        return s
    if cx.shape(src) is None:
        return None
    return index_state(cx, s, cx.shape(src), idx)


def index_state(cx: Cx, s: Any, a: tuple[int, ...], idx: Any) -> Any:
    """State of ``x[idx]`` for basic indexing and one advanced index on a non-unit dim."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded: list[Any] = []
    for it in items:
        if it is Ellipsis:
            expanded += [slice(None)] * (len(a) - consuming)
        else:
            expanded.append(it)
    expanded += [slice(None)] * (len(a) - sum(1 for it in expanded if it is not None))
    ids = s.ids if isinstance(s, Table) else None
    tdims = list(s.dims) if isinstance(s, Table) else []
    pmaps = [list(m) for _, m in s.sources] if isinstance(s, ParamRef) else []
    out_map: dict[int, int] = {}  # input dim -> output dim
    new_pm: list[dict[int, Any]] = [dict() for _ in pmaps]
    din = dout = 0
    advanced = 0
    for it in expanded:
        if it is None:
            for pm in new_pm:
                pm[dout] = -1
            dout += 1
            continue
        if isinstance(it, fx.Node) and isinstance(cx.metas.get(it), TensorSpec):
            spec = cx.metas[it]
            advanced += 1
            if advanced > 1 or spec.dtype == torch.bool or din in tdims:
                raise RuleFailure("advanced indexing on a unit dim or with several index tensors")
            k = len(spec.shape)
            for j in range(k):
                for pm in new_pm:
                    pm[dout + j] = None
            din += 1
            dout += k
            continue
        v = cx.val(it)
        if isinstance(v, (list, tuple)):
            raise RuleFailure("list index")
        if isinstance(v, int):
            if din in tdims:
                ax = tdims.index(din)
                ids = ids.take(norm_dim(v, a[din]), axis=ax)
                tdims.pop(ax)
            din += 1
            continue
        if isinstance(v, slice):
            if din in tdims:
                ax = tdims.index(din)
                sl = [slice(None)] * ids.ndim
                sl[ax] = v
                ids = ids[tuple(sl)]
            for pm, old in zip(new_pm, pmaps):
                full = v == slice(None) or (
                    v.start in (None, 0) and v.step in (None, 1) and (v.stop is None or v.stop >= a[din])
                )
                pm[dout] = old[din] if full or old[din] == -1 else None
            out_map[din] = dout
            din += 1
            dout += 1
            continue
        raise RuleFailure(f"index item {v!r}")
    if isinstance(s, Table):
        new_dims = [out_map[d] for d in tdims]
        return table_or_none(new_dims, ids) if new_dims else None
    if isinstance(s, ParamRef):
        nd = len(cx.out_shape)
        return ParamRef(tuple((n, tuple(pm.get(d, None) for d in range(nd))) for (n, _), pm in zip(s.sources, new_pm)))
    return None


@function_rule("slice")
def rule_slice_aten(cx: Cx) -> Any:
    """aten.slice(x, dim, start, end, step)."""
    x = cx.this()
    a = cx.shape(x)
    dim = norm_dim(int(cx.val(cx.arg(1, "dim", 0))), len(a))
    start, end, step = cx.val(cx.arg(2, "start")), cx.val(cx.arg(3, "end")), cx.val(cx.arg(4, "step", 1))
    idx = tuple([slice(None)] * dim + [slice(start, end, step)])
    return index_state(cx, cx.st(x), a, idx)


@function_rule("select")
def rule_select(cx: Cx) -> Any:
    x = cx.this()
    a = cx.shape(x)
    m = cx.node.op == "call_method"
    dim = norm_dim(int(cx.val(cx.arg(0 if m else 1, "dim"))), len(a))
    index = int(cx.val(cx.arg(1 if m else 2, "index")))
    return index_state(cx, cx.st(x), a, tuple([slice(None)] * dim + [index]))


@function_rule("narrow")
def rule_narrow(cx: Cx) -> Any:
    x = cx.this()
    a = cx.shape(x)
    m = cx.node.op == "call_method"
    dim = norm_dim(int(cx.val(cx.arg(0 if m else 1, "dim"))), len(a))
    start, length = int(cx.val(cx.arg(1 if m else 2, "start"))), int(cx.val(cx.arg(2 if m else 3, "length")))
    return index_state(cx, cx.st(x), a, tuple([slice(None)] * dim + [slice(start, start + length)]))


@function_rule("split", "chunk", "split_with_sizes", "tensor_split", "unbind", "unsafe_split", "unsafe_chunk")
def rule_split(cx: Cx) -> Any:
    """split/chunk/split_with_sizes/tensor_split/unbind: output sizes come from the concrete outputs."""
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    outs = cx.out
    if not isinstance(outs, (list, tuple)) or not all(isinstance(o, TensorSpec) for o in outs):
        raise RuleFailure("split without tensor outputs")
    m = cx.node.op == "call_method"
    dim_pos = 0 if cx.op == "unbind" else 1
    dim = norm_dim(int(cx.val(cx.arg(dim_pos if m else dim_pos + 1, "dim", 0))), len(a))
    if cx.op == "unbind":
        return [index_state(cx, s, a, tuple([slice(None)] * dim + [i])) for i in range(len(outs))]
    res, start = [], 0
    for o in outs:
        size = o.shape[dim]
        res.append(index_state(cx, s, a, tuple([slice(None)] * dim + [slice(start, start + size)])))
        start += size
    return res


@function_rule("cat", "concat", "concatenate", "stack")
def rule_cat(cx: Cx) -> Any:
    """cat along a unit dim concatenates tables (offset ranges); along another dim it couples operands."""
    tensors = cx.arg(0, "tensors")
    if not isinstance(tensors, (list, tuple)):
        raise RuleFailure("cat of a non-list")
    b = cx.out_shape
    dim = norm_dim(int(cx.val(cx.arg(1, "dim", 0))), len(b))
    ops = [(cx.st(t), cx.shape(t), cx.label(t)) for t in tensors]
    if cx.op == "stack":  # stack == unsqueeze + cat along the new dim
        ops = [(unsqueezed(s, dim), sh[:dim] + (1,) + sh[dim:], lab) for s, sh, lab in ops]
    params_1d = len(b) == 1 and all(isinstance(s, ParamRef) for s, _, _ in ops)  # cat((q_bias, k_bias, v_bias))
    if not params_1d and not any(isinstance(s, Table) and dim in s.dims for s, _, _ in ops):
        return _cat_coupled(cx, ops, dim, b)
    other = sorted({d for s, _, _ in ops if isinstance(s, Table) for d in s.dims if d != dim})
    all_dims = sorted(set(other) | {dim})
    parts = []
    for s, sh, lab in ops:
        if isinstance(s, Table) and dim in s.dims:
            part = operand_array(s, sh, b[:dim] + (sh[dim],) + b[dim + 1 :], tuple(all_dims))
            parts.append(np.broadcast_to(part, [sh[dim] if d == dim else b[d] for d in all_dims]))
            continue
        fresh = cx.store.fresh(sh[dim])
        shape_all = [sh[dim] if d == dim else b[d] for d in all_dims]
        pos = all_dims.index(dim)
        part = np.broadcast_to(fresh.reshape([-1 if k == pos else 1 for k in range(len(shape_all))]), shape_all)
        if isinstance(s, ParamRef):
            t = Table((0,), fresh)
            for name, dmap in s.sources:
                if dmap[dim] is not None and dmap[dim] >= 0:
                    record_param(cx, t, name, {0: dmap[dim]}, "param")
                else:
                    cx.store.pin(fresh, f"{cx.where()} concatenates parameter-derived units it cannot trace")
        else:
            cx.store.pin(fresh, f"{cx.where()} concatenates '{lab}', which has no units on dim {dim}")
        if other:
            cx.store.pin(fresh, f"{cx.where()} concatenates a unit-less operand into a multi-dim table")
        parts.append(part)
    ids = np.concatenate(parts, axis=all_dims.index(dim))
    return Table(tuple(all_dims), np.ascontiguousarray(ids))


def _cat_coupled(cx: Cx, ops: list[tuple[Any, tuple[int, ...], str]], dim: int, b: tuple[int, ...]) -> Any:
    """cat along a dim without units: couple the operands position-wise on every other dim."""
    squeezed = [(drop_dim_state(s, dim), sh[:dim] + sh[dim + 1 :], lab) for s, sh, lab in ops]
    res = couple(cx, squeezed, b[:dim] + b[dim + 1 :])
    if isinstance(res, Table):
        return Table(tuple(d + (d >= dim) for d in res.dims), res.ids)
    if isinstance(res, ParamRef):  # parameters concatenated: positions along dim mix sources
        for s, _, _ in ops:
            taint_all(cx, s, f"concatenated by {cx.where()}")
    return None
