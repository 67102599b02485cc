"""What the unit-group walk tracks per value, and the store every rule records into.

A *unit element* is an integer id for one unit position of one producer. A tensor value carries a
:class:`Table` (its unit dims and the element id at each index over them), a :class:`ParamRef`
(computed from parameters alone), a :class:`ShapeDeps` (a Python value read from unit-dim sizes)
or ``None`` (no units). The :class:`Store` allocates elements and records unions, pins, head marks
and parameter places; ``unit_groups`` turns that record into groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PRODUCER_ROLES = ("conv_out", "conv_dw", "linear_out", "norm", "embedding_out", "param")
CONSUMER_ROLES = ("conv_in", "linear_in")
LAYERNORM_STREAMS = ("pin", "prune", "auto")  # what a LayerNorm over a unit dim does to its units (docs/prune.md)
APPROX_LAYERNORM = "layernorm"  # group semantics: LayerNorm statistics over the kept units only


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
    """Concrete shape and dtype of a tensor value (from one run on the example input)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


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
        """New elements, one per position of ``shape``."""
        size = int(np.prod(shape))
        ids = np.arange(self.count, self.count + size, dtype=np.int64).reshape(shape)
        self.count += size
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite ``a`` and ``b`` element-wise (broadcasting)."""
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
        """Make the groups of ``ids`` unprunable, with ``reason``."""
        if np.size(ids):
            self.pins.append((np.asarray(ids).ravel().copy(), reason))

    def param(self, node: str, param: str, dims: tuple[int, ...], ids: np.ndarray, role: str) -> None:
        """Record that parameter ``param`` holds ``ids`` on its ``dims`` (a slice a prune pass edits)."""
        self.places.append(Place(node, param, role, dims, np.asarray(ids)))

    def taint(self, param: str, reason: str) -> None:
        """Record that ``param`` is also used where units cannot be traced (its groups get pinned)."""
        self.taints.setdefault(param, reason)
