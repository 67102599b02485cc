"""Coupling core shared by the rules: element-wise unions, parameter adoption and failing closed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from .context import Cx
from .states import ParamRef, ShapeDeps, Table
from .tables import project


def taint_all(cx: Cx, state: Any, why: str) -> None:
    """Taint every parameter behind a :class:`ParamRef` state (no-op for other states)."""
    if isinstance(state, ParamRef):
        for name, _ in state.sources:
            cx.store.taint(name, why)


def operand_array(s: Table, sh: tuple[int, ...], out_shape: tuple[int, ...], dims: tuple[int, ...]) -> np.ndarray:
    """Ids of operand ``s`` (shape ``sh``) laid out over the output ``dims``, broadcastable (size-1 elsewhere)."""
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
            arr = operand_array(s, sh, out_shape, dims)
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


def merge_shape_deps(states: list[Any]) -> ShapeDeps | None:
    """One :class:`ShapeDeps` reading every unit count the given states read, or None."""
    ids = tuple(i for s in states if isinstance(s, ShapeDeps) for i in s.ids)
    return ShapeDeps(ids) if ids else None


def check_shape_scalars(cx: Cx) -> None:
    """Sizes of unit dims used as numbers in tensor arithmetic change when units are pruned: pin."""
    nodes: list[fx.Node] = []
    fx.node.map_arg((cx.node.args, cx.node.kwargs), nodes.append)
    for a in nodes:
        s = cx.states.get(a)
        if isinstance(s, ShapeDeps):
            for ids in s.ids:
                cx.store.pin(ids, f"the size of a unit dim is used as a number in {cx.where()}")


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


def unknown_module(cx: Cx) -> Any:
    """:func:`unknown` for a leaf module no rule understands; the reason names its class and node."""
    return unknown(cx, f"unknown module {type(cx.module).__name__} at node {cx.node.name}")
