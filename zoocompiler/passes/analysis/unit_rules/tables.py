"""Operations on unit tables and parameter refs: build, project, reshape, permute."""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import Cx, RuleFailure
from .states import ParamRef, Store, Table


def table_or_none(dims: list[int] | tuple[int, ...], ids: np.ndarray) -> Table | None:
    """A table over ``dims`` (any order; sorted here with ``ids``), or None when ``dims`` is empty."""
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
    """Move a parameter ref through a reshape: a dim keeps its parameter dim only when not merged/split."""
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


def unsqueezed(s: Any, dim: int) -> Any:
    """State of ``x.unsqueeze(dim)``."""
    if isinstance(s, Table):
        return Table(tuple(d + (d >= dim) for d in s.dims), s.ids)
    if isinstance(s, ParamRef):
        return ParamRef(tuple((n, m[:dim] + (-1,) + m[dim:]) for n, m in s.sources))
    return s


def drop_dim_state(s: Any, dim: int) -> Any:
    """State without tensor dim ``dim`` (which must carry no units): later dims shift down."""
    if isinstance(s, Table):
        if dim in s.dims:
            raise RuleFailure("drop of a unit dim")
        return table_or_none([d - (d > dim) for d in s.dims], s.ids)
    if isinstance(s, ParamRef):
        return ParamRef(tuple((n, m[:dim] + m[dim + 1 :]) for n, m in s.sources))
    return s
