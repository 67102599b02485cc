"""Per-op rules of the unit-group analysis: how each op creates, carries, couples or pins units.

A *unit element* is an integer id for one unit position of one producer (a conv output channel,
a linear output feature, a model-input channel, an attention head). Every tensor value carries
a :class:`Table`: the dims that carry units and an integer array of element ids over them.
Rules create fresh elements (producers), carry them (identity-like ops, views), couple them
(:meth:`Store.union`: element-wise ops, norms, concat along other dims, attention heads) or pin
them (:meth:`Store.pin`: ops that are not understood or not prunable), and record where
parameters hold them (:meth:`Store.param`) -- the slices a prune pass edits.

Tensors computed from parameters alone (``get_attr`` nodes and views of them) carry a
:class:`ParamRef` instead: which parameter dim each of their dims is. When such a tensor meets a
unit table (``x + pos_embed``, ``x * gamma``, ``cat([cls_token, x])``) the parameter adopts the
units there. Anything the rules cannot follow fails closed: units it touches are pinned with a
reason naming the op and the node.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

# ----------------------------------------------------------------------------- value states


@dataclass(frozen=True)
class Table:
    """Unit elements of a tensor: ``ids[i, j, ..]`` is the element at index (i, j, ..) of ``dims``."""

    dims: tuple[int, ...]  # ascending tensor dims that carry units
    ids: np.ndarray  # shape == tuple(shape[d] for d in dims)


@dataclass(frozen=True)
class ParamRef:
    """A tensor computed from parameters alone: per source, the parameter dim behind each tensor dim.

    A map entry is a parameter dim, ``-1`` (the tensor is constant along that dim: broadcast) or
    ``None`` (the dim mixes parameter positions in a way the rules do not follow).
    """

    sources: tuple[tuple[str, tuple[int | None, ...]], ...]


@dataclass(frozen=True)
class ShapeDeps:
    """A Python value computed from tensor sizes; ``ids`` are the unit elements whose count it reads.

    ``per_dim`` is set for a whole shape (``x.shape``, ``x.size()``): the elements behind each entry.
    """

    ids: tuple[np.ndarray, ...]
    per_dim: tuple[tuple[np.ndarray, ...], ...] | None = None


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


PRODUCER_ROLES = ("conv_out", "conv_dw", "linear_out", "norm", "embedding_out", "param")
CONSUMER_ROLES = ("conv_in", "linear_in")
LAYERNORM_STREAMS = ("pin", "prune")  # what a LayerNorm over a unit dim does to its units (docs/prune.md)
APPROX_LAYERNORM = "layernorm"  # group semantics: LayerNorm statistics over the kept units only


@dataclass
class Place:
    """Where elements sit: a node's value (``param`` None) or a parameter/buffer slice."""

    node: str
    param: str | None
    role: str
    dims: tuple[int, ...]
    ids: np.ndarray


@dataclass
class Store:
    """Element allocator plus everything the rules record: unions, pins, head marks, places."""

    count: int = 0
    pairs: list[np.ndarray] = field(default_factory=list)
    pins: list[tuple[np.ndarray, str]] = field(default_factory=list)
    heads: list[np.ndarray] = field(default_factory=list)
    places: list[Place] = field(default_factory=list)
    taints: dict[str, str] = field(default_factory=dict)  # parameter -> why it cannot be sliced
    approx: list[tuple[np.ndarray, str]] = field(default_factory=list)  # elements whose pruning changes a norm

    def mark_approx(self, ids: np.ndarray, tag: str) -> None:
        """Record that pruning ``ids`` is exact only under the relaxed semantics ``tag`` (e.g. "layernorm")."""
        if np.size(ids):
            self.approx.append((np.asarray(ids).ravel().copy(), tag))

    def fresh(self, shape: int | tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        ids = np.arange(self.count, self.count + size, dtype=np.int64).reshape(shape)
        self.count += size
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        a, b = a.ravel(), b.ravel()
        keep = a != b
        if keep.any():
            self.pairs.append(np.unique(np.stack([a[keep], b[keep]], axis=1), axis=0))

    def union_along(self, ids: np.ndarray, keep_axes: tuple[int, ...]) -> np.ndarray:
        """Couple all elements that share an index over ``keep_axes``; return one id per such index."""
        other = [ax for ax in range(ids.ndim) if ax not in keep_axes]
        if not other:
            return ids
        moved = np.transpose(ids, list(keep_axes) + other)
        kept_shape = moved.shape[: len(keep_axes)]
        flat = moved.reshape(int(np.prod(kept_shape)), -1)
        self.union(flat[:, :1], flat)
        return flat[:, 0].reshape(kept_shape)

    def pin(self, ids: np.ndarray, reason: str) -> None:
        if np.size(ids):
            self.pins.append((np.asarray(ids).ravel().copy(), reason))

    def param(self, node: str, param: str, dims: tuple[int, ...], ids: np.ndarray, role: str) -> None:
        self.places.append(Place(node, param, role, dims, np.asarray(ids)))

    def taint(self, param: str, reason: str) -> None:
        self.taints.setdefault(param, reason)


# ----------------------------------------------------------------------------- rule context


class RuleFailure(Exception):
    """A rule met a form it does not handle; the driver falls back to the unknown-op rule."""


@dataclass
class Cx:
    """What a rule sees: the node, the states and concrete metas of its inputs, and the store."""

    store: Store
    gm: fx.GraphModule
    node: fx.Node
    states: dict[fx.Node, Any]
    metas: dict[fx.Node, Any]
    op: str
    layernorm_streams: str = "pin"  # "pin": a LayerNorm over a unit dim pins it; "prune": it does not

    def arg(self, i: int, name: str | None = None, default: Any = None) -> Any:
        """Argument ``i`` (counted after ``self`` for methods) or keyword ``name``, else ``default``."""
        args = self.node.args[1:] if self.node.op == "call_method" else self.node.args
        if i < len(args):
            return args[i]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def this(self) -> Any:
        """First operand: ``self`` for methods, first argument for functions."""
        return self.node.args[0] if self.node.args else next(iter(self.node.kwargs.values()), None)

    def st(self, a: Any) -> Any:
        return self.states.get(a) if isinstance(a, fx.Node) else None

    def shape(self, a: Any) -> tuple[int, ...] | None:
        m = self.metas.get(a) if isinstance(a, fx.Node) else None
        return m.shape if isinstance(m, TensorSpec) else None

    def val(self, a: Any) -> Any:
        """Concrete Python value of a non-tensor argument (nodes replaced by their recorded values)."""
        return fx.node.map_aggregate(a, lambda x: self.metas.get(x) if isinstance(x, fx.Node) else x)

    @property
    def out(self) -> Any:
        return self.metas.get(self.node)

    @property
    def out_shape(self) -> tuple[int, ...]:
        m = self.out
        if not isinstance(m, TensorSpec):
            raise RuleFailure("output is not a single tensor")
        return m.shape

    def where(self) -> str:
        return f"{self.op} at node {self.node.name}"

    def label(self, a: Any) -> str:
        return a.name if isinstance(a, fx.Node) else repr(a)


# ----------------------------------------------------------------------------- table helpers


def _dim(d: int, ndim: int) -> int:
    if not -ndim <= d < max(ndim, 1):
        raise RuleFailure(f"dim {d} out of range for rank {ndim}")
    return d % ndim if ndim else 0


def table_or_none(dims: list[int] | tuple[int, ...], ids: np.ndarray) -> Table | None:
    if not dims:
        return None
    order = np.argsort(dims)
    return Table(tuple(int(dims[i]) for i in order), np.ascontiguousarray(np.transpose(ids, order)))


def project(store: Store, t: Table, keep: tuple[int, ...]) -> np.ndarray:
    """Ids of ``t`` over the tensor dims ``keep`` (all in ``t.dims``), coupling across the others."""
    return store.union_along(t.ids, tuple(t.dims.index(d) for d in keep))


def shape_runs(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape ``a -> b`` into runs of input and output dims with equal products."""
    runs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        a1 = i < len(a) and a[i] == 1
        b1 = j < len(b) and b[j] == 1
        if a1 and not b1:
            runs.append(([i], []))
            i += 1
            continue
        if b1 and not a1:
            runs.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            raise RuleFailure(f"cannot match reshape {a} -> {b}")
        ins, outs, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                ins.append(i)
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                outs.append(j)
                j += 1
            else:
                raise RuleFailure(f"cannot match reshape {a} -> {b}")
        runs.append((ins, outs))
    return runs


def reshape_table(cx: Cx, t: Table, a: tuple[int, ...], b: tuple[int, ...]) -> Table | None:
    """Move a table through a reshape: element ids follow their positions (expansion on merges)."""
    runs = shape_runs(a, b)
    full = np.reshape(t.ids, [a[d] if d in t.dims else 1 for d in range(len(a))])
    touched = [run for run in runs if any(d in t.dims for d in run[0])]
    wide = {d for ins, _ in touched for d in ins}
    full = np.broadcast_to(full, [a[d] if d in wide else 1 for d in range(len(a))])
    target: list[int] = []
    out_dims: list[int] = []
    for ins, outs in runs:
        if any(d in t.dims for d in ins):
            if not outs:
                cx.store.pin(t.ids, f"{cx.where()} removes a unit dim")
            target += [b[j] for j in outs]
            out_dims += outs
        else:
            target += [1] * len(outs)
    moved = full.reshape(target) if target else full.reshape(())
    ids = moved.reshape([b[j] for j in out_dims]) if out_dims else None
    if ids is None:
        return None
    # Drop output dims of size > 1 along which ids are constant (unit-free dims that were merged
    # then split); keep size-1 dims (a single head) and at least one dim per run, so a unit
    # spanning a whole run is not lost.
    keep = []
    for _, outs in touched:
        mine = [k for k, d in enumerate(out_dims) if d in outs]
        kept = [k for k in mine if ids.shape[k] == 1 or not np.all(ids == ids.take([0], axis=k))]
        keep += kept if kept else mine[:1]
    drop = [k for k in range(len(out_dims)) if k not in keep]
    for k in sorted(drop, reverse=True):
        ids = ids.take(0, axis=k)
    return table_or_none([out_dims[k] for k in sorted(keep)], ids)


def reshape_paramref(p: ParamRef, a: tuple[int, ...], b: tuple[int, ...]) -> ParamRef:
    runs = shape_runs(a, b)
    sources = []
    for name, dmap in p.sources:
        new: list[int | None] = [-1 if s == 1 else None for s in b]
        for ins, outs in runs:
            n_in = [i for i in ins if a[i] > 1]
            n_out = [j for j in outs if b[j] > 1]
            if len(n_in) == 1 and len(n_out) == 1:
                new[n_out[0]] = dmap[n_in[0]]
            elif all(dmap[i] == -1 for i in n_in):
                for j in n_out:
                    new[j] = -1
        sources.append((name, tuple(new)))
    return ParamRef(tuple(sources))


def permute_state(state: Any, perm: list[int]) -> Any:
    """State of ``x.permute(perm)``."""
    if isinstance(state, Table):
        new_dims = [perm.index(d) for d in state.dims]
        return table_or_none(new_dims, state.ids)
    if isinstance(state, ParamRef):
        return ParamRef(tuple((n, tuple(m[p] for p in perm)) for n, m in state.sources))
    return state


def taint_all(cx: Cx, state: Any, why: str) -> None:
    if isinstance(state, ParamRef):
        for name, _ in state.sources:
            cx.store.taint(name, why)


# ----------------------------------------------------------------------------- coupling core


def _operand_array(s: Table, sh: tuple[int, ...], out_shape: tuple[int, ...], dims: tuple[int, ...]) -> np.ndarray:
    off = len(out_shape) - len(sh)
    ids = s.ids
    for ax in reversed(range(len(s.dims))):
        if s.dims[ax] + off not in dims or sh[s.dims[ax]] != out_shape[s.dims[ax] + off]:
            ids = ids.take(0, axis=ax)
    shape = [out_shape[d] if (d - off >= 0 and d - off in s.dims and sh[d - off] > 1) else 1 for d in dims]
    return ids.reshape(shape)


def record_param(cx: Cx, t: Table, name: str, mapping: dict[int, int], role: str) -> None:
    """Record that parameter ``name`` holds ``t``'s units: tensor dim ``d`` is parameter dim ``mapping[d]``."""
    tdims = tuple(sorted(mapping))
    ids = project(cx.store, t, tdims)
    order = np.argsort([mapping[d] for d in tdims])
    cx.store.param(cx.node.name, name, tuple(sorted(mapping.values())), np.transpose(ids, order), role)


def couple(
    cx: Cx, operands: list[tuple[Any, tuple[int, ...] | None, str]], out_shape: tuple[int, ...], role: str = "param"
) -> Any:
    """Broadcasting element-wise coupling of ``operands`` (state, shape, label) into ``out_shape``.

    Operands align from the right; elements at the same output position are united. Parameter
    operands adopt the units; untracked tensors that vary along a unit dim pin it.
    """
    n = len(out_shape)
    tensors = [(s, sh, lab) for s, sh, lab in operands if sh is not None]
    unit_dims: set[int] = set()
    for s, sh, lab in tensors:
        if isinstance(s, Table):
            off = n - len(sh)
            for d in s.dims:
                if sh[d] == out_shape[d + off]:
                    unit_dims.add(d + off)
                else:
                    cx.store.pin(s.ids, f"{cx.where()} broadcasts a single unit of '{lab}' over dim {d + off}")
    if not unit_dims:
        return merge_nontable(cx, tensors, out_shape)
    dims = tuple(sorted(unit_dims))
    arrays: list[np.ndarray] = []
    params: list[tuple[str, dict[int, int]]] = []
    pins: list[str] = []
    for s, sh, lab in tensors:
        off = n - len(sh)
        if isinstance(s, Table):
            arr = _operand_array(s, sh, out_shape, dims)
            if any(x > 1 for x in arr.shape) or arr.size == 1:
                arrays.append(arr)
        missing = [
            d for d in dims if d - off >= 0 and sh[d - off] > 1 and not (isinstance(s, Table) and d - off in s.dims)
        ]
        if not missing:
            continue
        if isinstance(s, ParamRef):
            for name, dmap in s.sources:
                mapping = {}
                for d in missing:
                    pd = dmap[d - off]
                    if pd is None:
                        pins.append(f"{cx.where()} combines units with parameter {name} through an untracked op")
                    elif pd >= 0:
                        mapping[d] = pd
                if mapping:
                    params.append((name, mapping))
        else:
            pins.append(f"{cx.where()} combines unit dim {missing[0]} with '{lab}', which has no units there")
    ref = max(arrays, key=lambda a: sum(x > 1 for x in a.shape))
    out = np.ascontiguousarray(np.broadcast_to(ref, [out_shape[d] for d in dims]))
    for arr in arrays:
        if arr is not ref:
            cx.store.union(out, arr)
    table = Table(dims, out)
    for reason in pins:
        cx.store.pin(out, reason)
    for name, mapping in params:
        record_param(cx, table, name, mapping, role)
    return table


def merge_nontable(cx: Cx, tensors: list[tuple[Any, tuple[int, ...], str]], out_shape: tuple[int, ...]) -> Any:
    """Element-wise result of operands that carry no units: a ParamRef if all are parameters."""
    n = len(out_shape)
    refs = [(s, sh) for s, sh, _ in tensors if isinstance(s, ParamRef)]
    if not refs:
        return None
    plain = [sh for s, sh, _ in tensors if not isinstance(s, ParamRef) and int(np.prod(sh)) > 1]
    if plain:
        for s, _ in refs:
            taint_all(cx, s, f"combined with a non-parameter tensor in {cx.where()}")
        return None
    sources = []
    for s, sh in refs:
        off = n - len(sh)
        for name, dmap in s.sources:
            sources.append(
                (name, tuple(dmap[d - off] if d - off >= 0 and sh[d - off] == out_shape[d] else -1 for d in range(n)))
            )
    return ParamRef(tuple(dict.fromkeys(sources)))


def pin_inputs(cx: Cx, reason: str) -> None:
    """Pin every unit table among the node's inputs; taint its parameter inputs."""
    for a in cx.node.all_input_nodes:
        s = cx.states.get(a)
        items = s if isinstance(s, list) else [s]
        for item in items:
            if isinstance(item, Table):
                cx.store.pin(item.ids, reason)
            elif isinstance(item, ShapeDeps):
                for ids in item.ids:
                    cx.store.pin(ids, reason)
            taint_all(cx, item, reason)


def unknown(cx: Cx, reason: str | None = None) -> Any:
    """Fail closed: pin what the node touches; its outputs carry no units."""
    pin_inputs(cx, reason or f"unknown op {cx.op} at node {cx.node.name}")
    if cx.node.op == "call_module":
        for pname, _ in cx.gm.get_submodule(cx.node.target).named_parameters():
            cx.store.taint(f"{cx.node.target}.{pname}", reason or f"used by unknown module at node {cx.node.name}")
    out = cx.out
    return [None] * len(out) if isinstance(out, (list, tuple)) else None


def check_shape_scalars(cx: Cx) -> None:
    """Sizes of unit dims used as numbers in tensor arithmetic change when units are pruned: pin."""
    nodes: list[fx.Node] = []
    fx.node.map_arg((cx.node.args, cx.node.kwargs), nodes.append)
    for a in nodes:
        s = cx.states.get(a)
        if isinstance(s, ShapeDeps):
            for ids in s.ids:
                cx.store.pin(ids, f"the size of a unit dim is used as a number in {cx.where()}")


# ----------------------------------------------------------------------------- generic rules


def rule_identity(cx: Cx) -> Any:
    return cx.st(cx.this())


def rule_pointwise(cx: Cx) -> Any:
    nodes: list[fx.Node] = []
    fx.node.map_arg((cx.node.args, cx.node.kwargs), nodes.append)
    if not isinstance(cx.out, TensorSpec):  # arithmetic on Python values (shapes): track what it reads
        return merge_shape_deps([cx.st(a) for a in nodes])
    check_shape_scalars(cx)
    operands = [(cx.st(a), cx.shape(a), a.name) for a in dict.fromkeys(nodes) if cx.shape(a) is not None]
    return couple(cx, operands, cx.out_shape)


def rule_reshape(cx: Cx) -> Any:
    x = cx.this()
    s, a, b = cx.st(x), cx.shape(x), cx.out_shape
    if isinstance(s, Table):
        return reshape_table(cx, s, a, b)
    if isinstance(s, ParamRef):
        return reshape_paramref(s, a, b)
    return None


def rule_expand(cx: Cx) -> Any:
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


def rule_repeat(cx: Cx) -> Any:
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
        return [_dim(int(d), ndim) for d in dims]
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = (
            (cx.val(cx.arg(0, "dim0")), cx.val(cx.arg(1, "dim1")))
            if cx.node.op == "call_method"
            else (cx.val(cx.arg(1, "dim0")), cx.val(cx.arg(2, "dim1")))
        )
        perm = list(range(ndim))
        d0, d1 = _dim(d0, ndim), _dim(d1, ndim)
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
        src, dst = [_dim(d, ndim) for d in src], [_dim(d, ndim) for d in dst]
        rest = [d for d in range(ndim) if d not in src]
        perm = [-1] * ndim
        for s_, d_ in zip(src, dst):
            perm[d_] = s_
        it = iter(rest)
        return [p if p >= 0 else next(it) for p in perm]
    raise RuleFailure(f"no permutation for {name}")


def rule_permute(cx: Cx) -> Any:
    x = cx.this()
    return permute_state(cx.st(x), _perm_from_args(cx, len(cx.shape(x))))


def _reduce_dims(cx: Cx, ndim: int, dim_arg: Any) -> list[int]:
    if dim_arg is None:
        return list(range(ndim))
    dims = [dim_arg] if isinstance(dim_arg, int) else list(dim_arg)
    return [_dim(int(d), ndim) for d in dims] if dims else list(range(ndim))


def rule_reduce(cx: Cx) -> Any:
    """mean/sum/amax/var/...: reducing a unit dim couples all its units (pinned); others carry."""
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    is_method = cx.node.op == "call_method"
    skip = 1 if cx.op in ("norm", "linalg_vector_norm") else 0  # norm(x, p, dim)
    dim_arg = cx.val(cx.arg((0 if is_method else 1) + skip, "dim"))
    if isinstance(dim_arg, torch.dtype):
        dim_arg = None
    if cx.op in ("max", "min") and isinstance(dim_arg, TensorSpec):
        return rule_pointwise(cx)  # max(a, b)
    dims = _reduce_dims(cx, len(a), dim_arg)
    first = cx.out[0] if isinstance(cx.out, (list, tuple)) else cx.out
    keepdim = isinstance(first, TensorSpec) and len(first.shape) == len(a)
    result: Any = None
    if isinstance(s, Table):
        hit = [d for d in s.dims if d in dims]
        if hit:
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


def rule_softmax(cx: Cx) -> Any:
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    if cx.node.op == "call_module":
        dim = getattr(cx.gm.get_submodule(cx.node.target), "dim", None)
        dim = -3 if type(cx.gm.get_submodule(cx.node.target)).__name__ == "Softmax2d" else dim
    else:
        dim = cx.val(cx.arg(0 if cx.node.op == "call_method" else 1, "dim"))
    if dim is None:
        raise RuleFailure("softmax without dim")
    d = _dim(int(dim), len(a))
    if isinstance(s, Table) and d in s.dims and a[d] > 1:
        cx.store.pin(s.ids, f"{cx.where()} normalises over unit dim {d} (all its units are coupled)")
    taint_all(cx, s, f"normalised by {cx.where()}")
    return s if isinstance(s, Table) else None


def rule_normalize(cx: Cx) -> Any:
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    d = _dim(int(cx.val(cx.arg(2, "dim", 1))), len(a))
    if isinstance(s, Table) and d in s.dims:
        cx.store.pin(s.ids, f"{cx.where()} normalises over unit dim {d} (all its units are coupled)")
    return s if isinstance(s, Table) else None


def spatial_carry(cx: Cx, n_spatial: int | None) -> Any:
    """Pooling/interpolation/padding over the trailing ``n_spatial`` dims carry units elsewhere."""
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


def _spatial_rank(name: str) -> int | None:
    for k in (1, 2, 3):
        if name.endswith(f"{k}d"):
            return k
    return None


def rule_spatial(cx: Cx) -> Any:
    return spatial_carry(cx, _spatial_rank(cx.op))


def rule_pad(cx: Cx) -> Any:
    return spatial_carry(cx, None)


def rule_roll(cx: Cx) -> Any:
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    dims = cx.val(cx.arg(1 if cx.node.op == "call_method" else 2, "dims"))
    dims = list(range(len(a))) if dims is None or dims == () else ([dims] if isinstance(dims, int) else list(dims))
    dims = [_dim(d, len(a)) for d in dims]
    if isinstance(s, Table) and any(d in s.dims for d in dims):
        cx.store.pin(s.ids, f"{cx.where()} rolls along a unit dim")
        return None
    return s if isinstance(s, Table) else None


def rule_channel_shuffle(cx: Cx) -> Any:
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


def merge_shape_deps(states: list[Any]) -> ShapeDeps | None:
    ids = tuple(i for s in states if isinstance(s, ShapeDeps) for i in s.ids)
    return ShapeDeps(ids) if ids else None


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
            ids = per_dim[_dim(int(dim), len(a))]
            return ShapeDeps(ids) if ids else None
        return ShapeDeps(every, per_dim)
    if cx.op == "getattr":
        return ShapeDeps(every, per_dim)
    return ShapeDeps(every) if every else None


def rule_getitem(cx: Cx) -> Any:
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
            shift = k
            din += 1
            dout += shift
            continue
        v = cx.val(it)
        if isinstance(v, (list, tuple)):
            raise RuleFailure("list index")
        if isinstance(v, int):
            if din in tdims:
                ax = tdims.index(din)
                ids = ids.take(_dim(v, a[din]), axis=ax)
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


def rule_slice_aten(cx: Cx) -> Any:
    """aten.slice(x, dim, start, end, step)."""
    x = cx.this()
    a = cx.shape(x)
    dim = _dim(int(cx.val(cx.arg(1, "dim", 0))), len(a))
    start, end, step = cx.val(cx.arg(2, "start")), cx.val(cx.arg(3, "end")), cx.val(cx.arg(4, "step", 1))
    idx = tuple([slice(None)] * dim + [slice(start, end, step)])
    return index_state(cx, cx.st(x), a, idx)


def rule_select(cx: Cx) -> Any:
    x = cx.this()
    a = cx.shape(x)
    m = cx.node.op == "call_method"
    dim, index = _dim(int(cx.val(cx.arg(0 if m else 1, "dim"))), len(a)), int(cx.val(cx.arg(1 if m else 2, "index")))
    return index_state(cx, cx.st(x), a, tuple([slice(None)] * dim + [index]))


def rule_narrow(cx: Cx) -> Any:
    x = cx.this()
    a = cx.shape(x)
    m = cx.node.op == "call_method"
    dim = _dim(int(cx.val(cx.arg(0 if m else 1, "dim"))), len(a))
    start, length = int(cx.val(cx.arg(1 if m else 2, "start"))), int(cx.val(cx.arg(2 if m else 3, "length")))
    return index_state(cx, cx.st(x), a, tuple([slice(None)] * dim + [slice(start, start + length)]))


def rule_split(cx: Cx) -> Any:
    """split/chunk/split_with_sizes/tensor_split/unbind: output sizes come from the concrete outputs."""
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    outs = cx.out
    if not isinstance(outs, (list, tuple)) or not all(isinstance(o, TensorSpec) for o in outs):
        raise RuleFailure("split without tensor outputs")
    m = cx.node.op == "call_method"
    default = 0
    dim_pos = 0 if cx.op == "unbind" else 1
    dim = _dim(int(cx.val(cx.arg(dim_pos if m else dim_pos + 1, "dim", default))), len(a))
    if cx.op == "unbind":
        return [index_state(cx, s, a, tuple([slice(None)] * dim + [i])) for i in range(len(outs))]
    res, start = [], 0
    for o in outs:
        size = o.shape[dim]
        res.append(index_state(cx, s, a, tuple([slice(None)] * dim + [slice(start, start + size)])))
        start += size
    return res


def rule_cat(cx: Cx) -> Any:
    """cat along a unit dim concatenates tables (offset ranges); along another dim it couples operands."""
    tensors = cx.arg(0, "tensors")
    if not isinstance(tensors, (list, tuple)):
        raise RuleFailure("cat of a non-list")
    b = cx.out_shape
    dim = _dim(int(cx.val(cx.arg(1, "dim", 0))), len(b))
    stack = cx.op == "stack"
    ops = [(cx.st(t), cx.shape(t), cx.label(t)) for t in tensors]
    if stack:  # stack == unsqueeze + cat along the new dim
        ops = [(_unsqueezed(s, dim), sh[:dim] + (1,) + sh[dim:], lab) for s, sh, lab in ops]
    along = any(isinstance(s, Table) and dim in s.dims for s, _, _ in ops)
    if not along:
        # couple the operands position-wise on every dim but the concat dim
        squeezed = [(_drop_dim_state(s, dim), sh[:dim] + sh[dim + 1 :], lab) for s, sh, lab in ops]
        res = couple(cx, squeezed, b[:dim] + b[dim + 1 :])
        if isinstance(res, Table):
            return Table(tuple(d + (d >= dim) for d in res.dims), res.ids)
        if isinstance(res, ParamRef):  # parameters concatenated: positions along dim mix sources
            for s, _, _ in ops:
                taint_all(cx, s, f"concatenated by {cx.where()}")
            return None
        return None
    other = sorted({d for s, _, _ in ops if isinstance(s, Table) for d in s.dims if d != dim})
    parts = []
    for s, sh, lab in ops:
        if isinstance(s, Table) and dim in s.dims:
            part = _operand_array(s, sh, b[:dim] + (sh[dim],) + b[dim + 1 :], tuple(sorted(set(other) | {dim})))
            parts.append(np.broadcast_to(part, [sh[dim] if d == dim else b[d] for d in sorted(set(other) | {dim})]))
            continue
        fresh = cx.store.fresh(sh[dim])
        shape_all = [sh[dim] if d == dim else b[d] for d in sorted(set(other) | {dim})]
        pos = sorted(set(other) | {dim}).index(dim)
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
    all_dims = sorted(set(other) | {dim})
    ids = np.concatenate(parts, axis=all_dims.index(dim))
    return Table(tuple(all_dims), np.ascontiguousarray(ids))


def _unsqueezed(s: Any, dim: int) -> Any:
    if isinstance(s, Table):
        return Table(tuple(d + (d >= dim) for d in s.dims), s.ids)
    if isinstance(s, ParamRef):
        return ParamRef(tuple((n, m[:dim] + (-1,) + m[dim:]) for n, m in s.sources))
    return s


def _drop_dim_state(s: Any, dim: int) -> Any:
    if isinstance(s, Table):
        if dim in s.dims:
            raise RuleFailure("drop of a unit dim")
        return table_or_none([d - (d > dim) for d in s.dims], s.ids)
    if isinstance(s, ParamRef):
        return ParamRef(tuple((n, m[:dim] + m[dim + 1 :]) for n, m in s.sources))
    return s


# ----------------------------------------------------------------------------- layers


def simple_param(s: Any, ndim: int) -> str | None:
    """Name of the parameter behind ``s`` when ``s`` is exactly that parameter (no view, no math)."""
    if isinstance(s, ParamRef) and len(s.sources) == 1 and s.sources[0][1] == tuple(range(ndim)):
        return s.sources[0][0]
    return None


def conv_units(cx: Cx, x: Any, weight: str, bias: str | None, groups: int, c_in: int, c_out: int) -> Table:
    """Conv: out channels are fresh (or follow the input channels for depthwise convs).

    Grouped convs (1 < groups, >1 channel per group) couple input channel i with i + k*C_in/groups
    and output channel o with o + k*C_out/groups: pruning then shrinks every group alike.
    """
    s = cx.st(x)
    in_ids = None
    if isinstance(s, Table):
        if s.dims != (1,):
            cx.store.pin(s.ids, f"{cx.where()} mixes positions along a unit dim")
        else:
            in_ids = s.ids
    cpg, opg = c_in // groups, c_out // groups
    if groups == 1:
        if in_ids is not None:
            cx.store.param(cx.node.name, weight, (1,), in_ids, "conv_in")
        out = cx.store.fresh(c_out)
        roles = "conv_out"
    elif cpg == 1:
        out = np.repeat(in_ids if in_ids is not None else cx.store.fresh(groups), opg)
        roles = "conv_dw"
    else:
        if in_ids is not None:
            row = cx.store.union_along(in_ids.reshape(groups, cpg), (1,))
            cx.store.param(cx.node.name, weight, (1,), row, "conv_in")
        out = np.tile(cx.store.fresh(opg), groups)
        roles = "conv_out"
    cx.store.param(cx.node.name, weight, (0,), out, roles)
    if bias is not None:
        cx.store.param(cx.node.name, bias, (0,), out, roles)
    return Table((1,), out)


def linear_units(cx: Cx, x: Any, weight: str, bias: str | None, out_features: int) -> Table:
    s, a = cx.st(x), cx.shape(x)
    last = len(a) - 1
    if isinstance(s, Table):
        if last in s.dims:
            cx.store.param(cx.node.name, weight, (1,), project(cx.store, s, (last,)), "linear_in")
        if s.dims != (last,):
            cx.store.pin(s.ids, f"{cx.where()} maps a tensor whose units are not only on the last dim")
    elif isinstance(s, ParamRef):
        taint_all(cx, s, f"consumed by {cx.where()}")
    out = cx.store.fresh(out_features)
    cx.store.param(cx.node.name, weight, (0,), out, "linear_out")
    if bias is not None:
        cx.store.param(cx.node.name, bias, (0,), out, "linear_out")
    return Table((len(cx.out_shape) - 1,), out)


def norm_params(cx: Cx, t: Table, dim: int, names: list[str | None]) -> None:
    if dim in t.dims:
        for name in names:
            if name is not None:
                record_param(cx, t, name, {dim: 0}, "norm")


def batchnorm_units(cx: Cx, x: Any, names: list[str | None]) -> Any:
    s = cx.st(x)
    if not isinstance(s, Table):
        return None
    norm_params(cx, s, 1, names)
    return s


def groupnorm_units(cx: Cx, x: Any, groups: int, names: list[str | None]) -> Any:
    """GroupNorm: the channels of one norm group are coupled (a unit is a whole norm group)."""
    s = cx.st(x)
    if not isinstance(s, Table):
        return None
    if s.dims != (1,):
        cx.store.pin(s.ids, f"{cx.where()} normalises over a unit dim other than channels")
        return s
    cx.store.union_along(s.ids.reshape(groups, -1), (0,))
    norm_params(cx, s, 1, names)
    return s


def layernorm_units(cx: Cx, x: Any, k: int, names: list[str | None]) -> Any:
    """LayerNorm over the last ``k`` dims: units there are coupled (statistics change when pruned).

    ``cx.layernorm_streams == "pin"`` pins them; ``"prune"`` leaves them prunable and marks them
    :data:`APPROX_LAYERNORM`: the pruned norm computes its statistics over the kept units only.
    The affine is recorded as ``norm`` either way.
    """
    s, a = cx.st(x), cx.shape(x)
    if not isinstance(s, Table):
        return None
    normed = [d for d in s.dims if d >= len(a) - k]
    if normed:
        if cx.layernorm_streams == "prune":
            cx.store.mark_approx(s.ids, APPROX_LAYERNORM)
        else:
            cx.store.pin(s.ids, f"LayerNorm over the unit dim couples all its units (node {cx.node.name})")
        for name in names:
            if name is not None:
                record_param(cx, s, name, {d: d - (len(a) - k) for d in normed}, "norm")
    return s


def _names(cx: Cx, args: list[Any], ndims: list[int]) -> list[str | None] | None:
    """Parameter names of functional-layer arguments; None if one is not a plain parameter."""
    out: list[str | None] = []
    for a, nd in zip(args, ndims):
        if a is None:
            out.append(None)
            continue
        name = simple_param(cx.st(a), nd)
        if name is None:
            return None
        out.append(name)
    return out


def _is_aten(cx: Cx) -> bool:
    return isinstance(cx.node.target, torch._ops.OpOverload)


def rule_linear_fn(cx: Cx) -> Any:
    x, w, b = cx.arg(0, "input"), cx.arg(1, "weight"), cx.arg(2, "bias")
    names = _names(cx, [w, b], [2, 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses a weight that is not a plain parameter")
    return linear_units(cx, x, names[0], names[1], cx.shape(w)[0])


def rule_conv_fn(cx: Cx) -> Any:
    x, w, b = cx.arg(0, "input"), cx.arg(1, "weight"), cx.arg(2, "bias")
    if cx.op == "convolution":
        if cx.val(cx.arg(6, "transposed")):
            return unknown(cx, f"{cx.where()} is a transposed convolution")
        groups = int(cx.val(cx.arg(8, "groups", 1)))
    else:
        groups = int(cx.val(cx.arg(6, "groups", 1)))
    wshape = cx.shape(w)
    names = _names(cx, [w, b], [len(wshape), 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses a weight that is not a plain parameter")
    return conv_units(cx, x, names[0], names[1], groups, cx.shape(x)[1], wshape[0])


def rule_batchnorm_fn(cx: Cx) -> Any:
    if _is_aten(cx):  # aten: input, weight, bias, running_mean, running_var
        args = [cx.arg(i) for i in (1, 2, 3, 4)]
    else:  # F.batch_norm: input, running_mean, running_var, weight, bias
        args = [cx.arg(3, "weight"), cx.arg(4, "bias"), cx.arg(1, "running_mean"), cx.arg(2, "running_var")]
    names = _names(cx, args, [1, 1, 1, 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses statistics that are not plain parameters")
    res = batchnorm_units(cx, cx.arg(0, "input"), names)
    if isinstance(cx.out, (list, tuple)):
        return [res] + [None] * (len(cx.out) - 1)
    return res


def rule_layernorm_fn(cx: Cx) -> Any:
    shape = cx.val(cx.arg(1, "normalized_shape"))
    k = 1 if isinstance(shape, int) else len(shape)
    names = _names(cx, [cx.arg(2, "weight"), cx.arg(3, "bias")], [k, k])
    if names is None:
        return unknown(cx, f"{cx.where()} uses an affine that is not a plain parameter")
    res = layernorm_units(cx, cx.arg(0, "input"), k, names)
    if isinstance(cx.out, (list, tuple)):
        return [res] + [None] * (len(cx.out) - 1)
    return res


def rule_groupnorm_fn(cx: Cx) -> Any:
    names = _names(cx, [cx.arg(2, "weight"), cx.arg(3, "bias")], [1, 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses an affine that is not a plain parameter")
    return groupnorm_units(cx, cx.arg(0, "input"), int(cx.val(cx.arg(1, "num_groups"))), names)


# ----------------------------------------------------------------------------- attention


def contract(cx: Cx, a: tuple[Any, tuple[int, ...]], b: tuple[Any, tuple[int, ...]], out_shape: tuple[int, ...]) -> Any:
    """Batched matmul of two activations ``a (..., n, k) @ b (..., k, m)``.

    The contracted elements of a and b are united position-wise. Units of the batch dims, a's n
    and b's m pass to the output (coupled like an element-wise op); when a batch dim keeps units
    (heads), every contracted element is united into them -- a head becomes one unit.
    """
    (sa, sha), (sb, shb) = a, b
    if len(sha) < 2 or len(shb) < 2:
        raise RuleFailure("matmul with a vector")
    ka, kb = len(sha) - 1, len(shb) - 2
    ta = sa if isinstance(sa, Table) else None
    tb = sb if isinstance(sb, Table) else None
    a_has_k = ta is not None and ka in ta.dims
    b_has_k = tb is not None and kb in tb.dims
    if a_has_k and b_has_k:  # unite a[..., k] with b[..., k, :] position-wise over the batch dims
        va = _without_dim(cx, ta, ka - 1)
        vb = _without_dim(cx, tb, kb + 1)
        couple(
            cx,
            [(va, tuple(sha[:-2]) + (sha[-1],), "lhs"), (vb, tuple(shb[:-2]) + (shb[-2],), "rhs")],
            tuple(torch.broadcast_shapes(torch.Size(sha[:-2]), torch.Size(shb[:-2]))) + (sha[-1],),
        )
    elif a_has_k or b_has_k:
        t, k_t, other, k_o = (ta, ka, sb, kb) if a_has_k else (tb, kb, sa, ka)
        if isinstance(other, ParamRef):
            for name, dmap in other.sources:
                pd = dmap[k_o]
                if pd is not None and pd >= 0:
                    record_param(cx, t, name, {k_t: pd}, "linear_in")
                elif pd is None:
                    cx.store.pin(t.ids, f"{cx.where()} contracts units with an untracked parameter view")
        else:
            cx.store.pin(t.ids, f"{cx.where()} contracts a unit dim with a tensor that has no units there")
    va = _kept_units(cx, ta, sha, ka)
    vb = _kept_units(cx, tb, shb, kb)
    ops = [
        (va if ta is not None else sa, tuple(sha[:-1]) + (1,), "lhs"),
        (vb if tb is not None else sb, tuple(shb[:-2]) + (1, shb[-1]), "rhs"),
    ]
    return couple(cx, ops, out_shape)


def _without_dim(cx: Cx, t: Table, drop: int) -> Table:
    """``t`` without tensor dim ``drop`` (coupling across it if it carries units); later dims shift down."""
    kept = tuple(d for d in t.dims if d != drop)
    ids = project(cx.store, t, kept) if drop in t.dims else t.ids
    return Table(tuple(d - (d > drop) for d in kept), ids)


def _kept_units(cx: Cx, t: Table | None, sh: tuple[int, ...], drop: int) -> Table | None:
    """An operand's units on the dims that survive the contraction of dim ``drop``.

    Contracted elements are united into the kept units (marked as heads when those sit on batch dims).
    """
    if t is None:
        return None
    kept = tuple(d for d in t.dims if d != drop)
    if not kept:
        return None
    ids = project(cx.store, t, kept)
    if drop in t.dims and any(d < len(sh) - 2 for d in kept):
        cx.store.heads.append(ids.ravel().copy())
    return Table(kept, ids)


def rule_matmul(cx: Cx) -> Any:
    a, b = cx.arg(0, "input"), cx.arg(1, "other")
    if cx.node.op == "call_method":
        a, b = cx.node.args[0], cx.node.args[1]
    sa, sb = cx.st(a), cx.st(b)
    sha, shb = cx.shape(a), cx.shape(b)
    if sha is None or shb is None:
        raise RuleFailure("matmul operand is not a tensor")
    for s, sh, other, osh, side in ((sb, shb, sa, sha, "rhs"), (sa, sha, sb, shb, "lhs")):
        if isinstance(s, ParamRef) and len(sh) == 2 and simple_param(s, 2) and isinstance(other, (Table, type(None))):
            return _matmul_weight(cx, other, osh, s.sources[0][0], side)
    return contract(cx, (sa, sha), (sb, shb), cx.out_shape)


def _matmul_weight(cx: Cx, x: Any, sh: tuple[int, ...], weight: str, side: str) -> Any:
    """``x @ W`` (W: k×m parameter) behaves like a linear layer with rows/cols swapped."""
    if side == "lhs":
        raise RuleFailure("parameter on the left of matmul")
    last = len(sh) - 1
    if isinstance(x, Table):
        if last in x.dims:
            cx.store.param(cx.node.name, weight, (0,), project(cx.store, x, (last,)), "linear_in")
        if x.dims != (last,):
            cx.store.pin(x.ids, f"{cx.where()} maps a tensor whose units are not only on the last dim")
    out = cx.store.fresh(cx.out_shape[-1])
    cx.store.param(cx.node.name, weight, (1,), out, "linear_out")
    return Table((len(cx.out_shape) - 1,), out)


def rule_sdpa(cx: Cx) -> Any:
    q, k, v = cx.arg(0, "query"), cx.arg(1, "key"), cx.arg(2, "value")
    mask = cx.arg(3, "attn_mask")
    check_shape_scalars(cx)
    sq, sk, sv = cx.st(q), cx.st(k), cx.st(v)
    shq, shk, shv = cx.shape(q), cx.shape(k), cx.shape(v)
    if len(shq) < 2:
        raise RuleFailure("attention on vectors")
    perm = list(range(len(shk)))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    skt, shkt = permute_state(sk, perm), tuple(shk[p] for p in perm)
    batch = torch.broadcast_shapes(torch.Size(shq[:-2]), torch.Size(shk[:-2]))
    scores_shape = tuple(batch) + (shq[-2], shk[-2])
    scores = contract(cx, (sq, shq), (skt, shkt), scores_shape)
    if isinstance(mask, fx.Node) and cx.shape(mask) is not None:
        scores = couple(cx, [(scores, scores_shape, "scores"), (cx.st(mask), cx.shape(mask), mask.name)], scores_shape)
    return contract(cx, (scores, scores_shape), (sv, shv), cx.out_shape)


def heads_units(
    cx: Cx,
    x: Any,
    heads: int,
    head_dim: int,
    c_out: int,
    qkv: list[tuple[str, int]],
    proj_w: str,
    proj_b: str | None,
    extra: list[tuple[str, int, str]],
    reason: str,
    in_weights: list[tuple[Any, str]],
) -> Table:
    """A fused attention layer: input consumed like a linear, heads as units, output produced fresh."""
    for xi, wname in in_weights:
        s, a = cx.st(xi), cx.shape(xi)
        if isinstance(s, Table):
            last = len(a) - 1
            if last in s.dims:
                cx.store.param(cx.node.name, wname, (1,), project(cx.store, s, (last,)), "linear_in")
            if s.dims != (last,):
                cx.store.pin(s.ids, f"{cx.where()} attends over a tensor with units off the feature dim")
    hid = cx.store.fresh(heads)
    cx.store.heads.append(hid)
    per_head = np.repeat(hid, head_dim)
    for name, copies in qkv:
        cx.store.param(cx.node.name, name, (0,), np.tile(per_head, copies), "linear_out")
    cx.store.param(cx.node.name, proj_w, (1,), per_head, "linear_in")
    for name, pdim, kind in extra:
        cx.store.param(cx.node.name, name, (pdim,), hid if kind == "head" else per_head, "param")
    cx.store.pin(hid, reason)
    out = cx.store.fresh(c_out)
    cx.store.param(cx.node.name, proj_w, (0,), out, "linear_out")
    if proj_b is not None:
        cx.store.param(cx.node.name, proj_b, (0,), out, "linear_out")
    return (
        Table((len(cx.out_shape) - 1,), out)
        if isinstance(cx.out, TensorSpec)
        else Table((len(cx.out[0].shape) - 1,), out)
    )


def rule_mha(cx: Cx, m: nn.MultiheadAttention) -> Any:
    t = cx.node.target
    q = cx.arg(0, "query")
    k, v = cx.arg(1, "key", q), cx.arg(2, "value", q)
    e, h = m.embed_dim, m.num_heads
    reason = (
        f"nn.MultiheadAttention at node {cx.node.name} derives head_dim from embed_dim; "
        "replace the module to prune heads"
    )
    extra = [(f"{t}.{n}", 2, "dim") for n in ("bias_k", "bias_v") if getattr(m, n, None) is not None]
    if m._qkv_same_embed_dim:
        qkv = [(f"{t}.in_proj_weight", 3)]
        in_weights = [(x, f"{t}.in_proj_weight") for x in dict.fromkeys([q, k, v])]
    else:
        qkv = [(f"{t}.{n}_proj_weight", 1) for n in "qkv"]
        in_weights = [(q, f"{t}.q_proj_weight"), (k, f"{t}.k_proj_weight"), (v, f"{t}.v_proj_weight")]
    fixed = [q] if not m._qkv_same_embed_dim else list(dict.fromkeys([q, k, v]))
    for a in fixed:  # the module checks query (and fused key/value) width == embed_dim
        s = cx.st(a)
        if isinstance(s, Table):
            cx.store.pin(s.ids, f"nn.MultiheadAttention at node {cx.node.name} needs input width == embed_dim")
    if m.in_proj_bias is not None:
        qkv.append((f"{t}.in_proj_bias", 3))
    bias = f"{t}.out_proj.bias" if m.out_proj.bias is not None else None
    out = heads_units(
        cx, q, h, e // h, m.out_proj.out_features, qkv, f"{t}.out_proj.weight", bias, extra, reason, in_weights
    )
    return [out, None]


def rule_swin_attention(cx: Cx) -> Any:
    """torchvision's ``shifted_window_attention``: heads as units; head_dim comes from the input width."""
    x = cx.arg(0, "input")
    qkv_w, proj_w, rpb = cx.arg(1, "qkv_weight"), cx.arg(2, "proj_weight"), cx.arg(3, "relative_position_bias")
    heads = int(cx.val(cx.arg(5, "num_heads")))
    qkv_b, proj_b, logit = cx.arg(9, "qkv_bias"), cx.arg(10, "proj_bias"), cx.arg(11, "logit_scale")
    names = _names(cx, [qkv_w, proj_w, qkv_b, proj_b], [2, 2, 1, 1])
    if names is None:
        return unknown(cx, f"{cx.where()} uses weights that are not plain parameters")
    qkv_rows = cx.shape(qkv_w)[0]
    head_dim = qkv_rows // (3 * heads)
    extra: list[tuple[str, int, str]] = []
    rs = cx.st(rpb)
    reason = f"{cx.where()} derives head_dim and its output width from the input width"
    if isinstance(rs, ParamRef):
        for name, dmap in rs.sources:
            if dmap[1] is not None and dmap[1] >= 0:
                extra.append((name, dmap[1], "head"))
    if logit is not None:
        ln = _names(cx, [logit], [3])
        if ln is None:
            return unknown(cx, f"{cx.where()} uses a logit scale that is not a plain parameter")
        extra.append((ln[0], 0, "head"))
    qkv = [(names[0], 3)] + ([(names[2], 3)] if names[2] else [])
    out = heads_units(
        cx, x, heads, head_dim, cx.shape(proj_w)[0], qkv, names[1], names[3], extra, reason, [(x, names[0])]
    )
    cx.store.pin(out.ids, reason)
    s = cx.st(x)
    if isinstance(s, Table):
        cx.store.pin(s.ids, reason)
    return out


def rule_swin_rel_bias(cx: Cx) -> Any:
    """torchvision's ``_get_relative_position_bias(table, index, window)``: (1, heads, N, N) from table (L, heads)."""
    name = simple_param(cx.st(cx.arg(0)), 2)
    if name is None:
        return unknown(cx)
    return ParamRef(((name, (-1, 1, None, None)),))


def rule_patch_merging_pad(cx: Cx) -> Any:
    """torchvision's ``_patch_merging_pad``: four spatial phases concatenated on the channel dim."""
    x = cx.this()
    s, a = cx.st(x), cx.shape(x)
    if not isinstance(s, Table):
        return None
    last = len(a) - 1
    if s.dims != (last,):
        cx.store.pin(s.ids, f"{cx.where()} moves positions along a unit dim")
        return None
    return Table((last,), np.tile(s.ids, 4))


def rule_maybe_add_mask(cx: Cx) -> Any:
    mask = cx.arg(1, "attn_mask")
    if not isinstance(mask, fx.Node):
        return cx.st(cx.arg(0))
    return rule_pointwise(cx)


def rule_no_units(cx: Cx) -> Any:
    """Ops whose result carries no units and does not depend on unit values (masks, metadata)."""
    return None


def rule_embedding_fn(cx: Cx) -> Any:
    w = cx.arg(1, "weight")
    name = simple_param(cx.st(w), 2)
    if name is None or _is_aten(cx):
        return unknown(cx)
    return embedding_units(cx, cx.arg(0, "input"), name, cx.shape(w)[1])


def embedding_units(cx: Cx, idx: Any, weight: str, dim: int) -> Table:
    s = cx.st(idx)
    if isinstance(s, Table):
        cx.store.pin(s.ids, f"{cx.where()} uses unit values as indices")
    out = cx.store.fresh(dim)
    cx.store.param(cx.node.name, weight, (1,), out, "embedding_out")
    return Table((len(cx.out_shape) - 1,), out)


# ----------------------------------------------------------------------------- dispatch tables

OPERATOR_NAMES = {
    "truediv": "div",
    "floordiv": "floor_divide",
    "iadd": "add",
    "isub": "sub",
    "imul": "mul",
    "itruediv": "div",
    "and_": "bitwise_and",
    "or_": "bitwise_or",
    "xor": "bitwise_xor",
    "invert": "bitwise_not",
    "pos": "positive",
    "ifloordiv": "floor_divide",
    "getattr": "getattr",
}

IDENTITY_OPS = {
    "contiguous",
    "clone",
    "detach",
    "to",
    "type",
    "float",
    "half",
    "double",
    "bfloat16",
    "type_as",
    "_to_copy",
    "alias",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "feature_dropout",
    "native_dropout",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
    "requires_grad",
    "cpu",
    "cuda",
    "lift_fresh_copy",
    "positive",
    "torchvision.ops.stochastic_depth.stochastic_depth",
}
POINTWISE_EXTRA = {"hardswish", "floor_divide"}  # element-wise ops ATen does not tag pointwise
RESHAPE_OPS = {
    "reshape",
    "view",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "_unsafe_view",
    "_reshape_alias",
    "ravel",
}
PERMUTE_OPS = {"permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis", "numpy_T"}
REDUCE_OPS = {
    "mean",
    "sum",
    "amax",
    "amin",
    "max",
    "min",
    "var",
    "std",
    "norm",
    "logsumexp",
    "prod",
    "all",
    "any",
    "argmax",
    "argmin",
    "nansum",
    "nanmean",
    "var_mean",
    "std_mean",
    "median",
    "linalg_vector_norm",
}
SOFTMAX_OPS = {"softmax", "log_softmax", "softmin", "_softmax", "_log_softmax"}
SPATIAL_OPS = {
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "lp_pool1d",
    "lp_pool2d",
    "lp_pool3d",
    "interpolate",
    "upsample",
    "upsample_nearest2d",
    "upsample_bilinear2d",
    "max_pool2d_with_indices",
    "_adaptive_avg_pool2d",
    "adaptive_max_pool2d_with_indices",
}
SPLIT_OPS = {"split", "chunk", "split_with_sizes", "tensor_split", "unbind", "unsafe_split", "unsafe_chunk"}
SHAPE_READS = {"size", "numel", "dim", "getattr"}

FUNCTION_RULES: dict[str, Callable[[Cx], Any]] = {
    "getitem": rule_getitem,
    "cat": rule_cat,
    "concat": rule_cat,
    "concatenate": rule_cat,
    "stack": rule_cat,
    "expand": rule_expand,
    "expand_as": rule_expand,
    "broadcast_to": rule_expand,
    "repeat": rule_repeat,
    "roll": rule_roll,
    "pad": rule_pad,
    "constant_pad_nd": rule_pad,
    "normalize": rule_normalize,
    "channel_shuffle": rule_channel_shuffle,
    "native_channel_shuffle": rule_channel_shuffle,
    "select": rule_select,
    "narrow": rule_narrow,
    "slice": rule_slice_aten,
    "linear": rule_linear_fn,
    "conv1d": rule_conv_fn,
    "conv2d": rule_conv_fn,
    "conv3d": rule_conv_fn,
    "convolution": rule_conv_fn,
    "batch_norm": rule_batchnorm_fn,
    "_native_batch_norm_legit_no_training": rule_batchnorm_fn,
    "layer_norm": rule_layernorm_fn,
    "native_layer_norm": rule_layernorm_fn,
    "group_norm": rule_groupnorm_fn,
    "embedding": rule_embedding_fn,
    "matmul": rule_matmul,
    "bmm": rule_matmul,
    "mm": rule_matmul,
    "scaled_dot_product_attention": rule_sdpa,
    "torchvision.models.swin_transformer.shifted_window_attention": rule_swin_attention,
    "torchvision.models.swin_transformer._get_relative_position_bias": rule_swin_rel_bias,
    "torchvision.models.swin_transformer._patch_merging_pad": rule_patch_merging_pad,
    "timm.layers.attention.maybe_add_mask": rule_maybe_add_mask,
    "timm.layers.attention.resolve_self_attn_mask": rule_no_units,
    "_assert": rule_no_units,
    **{
        name: rule_no_units
        for name in (
            "zeros",
            "ones",
            "full",
            "empty",
            "arange",
            "new_zeros",
            "new_ones",
            "new_full",
            "new_empty",
            "rand",
            "randn",
            "tensor",
            "as_tensor",
            "linspace",
            "eye",
            "scalar_tensor",
        )
    },
}


@functools.cache
def is_pointwise(name: str) -> bool:
    """Whether ATen tags ``name`` as a pointwise (broadcasting element-wise) op."""
    if name in POINTWISE_EXTRA:
        return True
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or not hasattr(packet, "overloads"):
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


def op_name(node: fx.Node) -> str:
    """Canonical op name: method/ATen/torch names bare (in-place ``_`` dropped), others qualified."""
    target = node.target
    if node.op == "call_method":
        name = str(target)
    elif isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target.__name__
    else:
        mod = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", repr(target))
        if target in (operator.getitem,):
            return "getitem"
        if mod in ("_operator", "operator"):
            return OPERATOR_NAMES.get(name, name)
        if target is getattr:
            return "getattr"
        if not (mod.startswith("torch") and not mod.startswith("torchvision")):
            return f"{mod}.{name}"
    if name.endswith("_") and not name.endswith("__") and not name.startswith("_"):
        name = name[:-1]
    return name


def function_rule(name: str) -> Callable[[Cx], Any] | None:
    """The rule for a call_function / call_method op name, or None (unknown op)."""
    if name in FUNCTION_RULES:
        return FUNCTION_RULES[name]
    if name in SHAPE_READS:
        return rule_shape_read
    if name in IDENTITY_OPS:
        return rule_identity
    if name in RESHAPE_OPS:
        return rule_reshape
    if name in PERMUTE_OPS:
        return rule_permute
    if name in REDUCE_OPS:
        return rule_reduce
    if name in SOFTMAX_OPS:
        return rule_softmax
    if name in SPATIAL_OPS:
        return rule_spatial
    if name in SPLIT_OPS:
        return rule_split
    if is_pointwise(name):
        return rule_pointwise
    return None


# ----------------------------------------------------------------------------- module rules


def _timm_norm_act_types() -> tuple[type, ...]:
    try:
        from timm.layers import norm_act
    except ImportError:
        return ()
    names = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
    return tuple(getattr(norm_act, n) for n in names if hasattr(norm_act, n))


def _is_param_free_activation(m: nn.Module) -> bool:
    if any(True for _ in m.parameters()):
        return False
    mod = type(m).__module__
    if isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return True
    excluded = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention, nn.GLU)
    return mod == "torch.nn.modules.activation" and not isinstance(m, excluded)


def module_rule(cx: Cx) -> Any:
    """Rule for a call_module leaf."""
    t = cx.node.target
    m = cx.gm.get_submodule(t)
    x = cx.node.args[0] if cx.node.args else None

    def p(name: str) -> str | None:
        return f"{t}.{name}" if getattr(m, name, None) is not None else None

    if isinstance(m, nn.modules.conv._ConvNd):
        if m.transposed:
            return unknown(cx, f"{cx.where()} is a transposed convolution (not supported)")
        return conv_units(cx, x, f"{t}.weight", p("bias"), m.groups, m.in_channels, m.out_channels)
    if isinstance(m, nn.Linear):
        return linear_units(cx, x, f"{t}.weight", p("bias"), m.out_features)
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, *_timm_norm_act_types())):
        act = getattr(m, "act", None)
        drop = getattr(m, "drop", None)
        for sub in (act, drop):
            if sub is not None and not _is_param_free_activation(sub):
                return unknown(cx, f"{cx.where()} applies a non-element-wise {type(sub).__name__}")
        return batchnorm_units(cx, x, [p("weight"), p("bias"), p("running_mean"), p("running_var")])
    if isinstance(m, nn.GroupNorm):
        return groupnorm_units(cx, x, m.num_groups, [p("weight"), p("bias")])
    if isinstance(m, nn.LayerNorm):
        if type(m).forward is not nn.LayerNorm.forward:  # e.g. a channels-first LayerNorm2d made a leaf
            return unknown(cx, f"{type(m).__name__} at node {cx.node.name} overrides LayerNorm.forward")
        return layernorm_units(cx, x, len(m.normalized_shape), [p("weight"), p("bias")])
    if isinstance(m, nn.MultiheadAttention):
        return rule_mha(cx, m)
    if isinstance(m, nn.Embedding):
        return embedding_units(cx, x, f"{t}.weight", m.embedding_dim)
    if _is_param_free_activation(m):
        check_shape_scalars(cx)
        return cx.st(x)
    if isinstance(m, (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)):
        return rule_softmax(cx)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return rule_reshape(cx)
    if isinstance(m, nn.ChannelShuffle):
        return rule_channel_shuffle(cx)
    pools = (
        nn.modules.pooling._AvgPoolNd,
        nn.modules.pooling._MaxPoolNd,
        nn.modules.pooling._AdaptiveAvgPoolNd,
        nn.modules.pooling._AdaptiveMaxPoolNd,
        nn.modules.pooling._LPPoolNd,
    )
    if isinstance(m, pools) or type(m).__name__ in ("AvgPool2dSame", "MaxPool2dSame"):
        return spatial_carry(cx, _spatial_rank(type(m).__name__.lower().replace("same", "")))
    if isinstance(m, (nn.Upsample,)) or type(m).__module__ == "torch.nn.modules.padding":
        return spatial_carry(cx, None)
    return unknown(cx, f"unknown module {type(m).__name__} at node {cx.node.name}")
