"""Shape, dtype, value-kind and layout analysis.

Reads the values of one run on the graph's example input (:mod:`.values`, which also writes
ShapeProp's ``tensor_meta``) and the shape values at one extra sample (to learn which follow the
batch size), then classifies every node:

* ``value_kind``: ``"tensor"`` (depends on the model input through tensor data),
  ``"param"`` (a tensor computed from parameters/constants alone), ``"shape"`` (a
  non-tensor value derived from tensor shapes: ``x.shape``, ``size()``, ``numel``),
  ``"const"`` (any other non-tensor value);
* ``tensor``: a :class:`~zoocompiler.ir.TensorInfo` with shape, dtype and layout
  (``map`` N×C×H×W, ``map_nhwc``, ``tokens`` B×N×D with prefix tokens, ``flat``, ``other``).

Shape values are what later passes treat as *recomputable*: they carry no data from the
input, so they never keep a value alive across a cut point.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from zoocompiler.ir import Layout, TensorInfo, node_info

from .values import SharedValues, alt_batch_values, values_of

_PERMUTE_TARGETS = {"permute", "transpose", "movedim", "swapaxes", torch.permute, torch.transpose, torch.movedim}
_RESHAPE_TARGETS = {"reshape", "view", "flatten", "unflatten", torch.reshape, torch.flatten}


def _is_shape_like(value: Any) -> bool:
    if isinstance(value, (bool, int, float, torch.SymInt, torch.Size)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_shape_like(v) for v in value)
    return False


def classify_values(gm: fx.GraphModule, shared: SharedValues | None = None) -> None:
    """Set ``node_info(n).value_kind`` and the concrete shape values for every node.

    Values come from ``shared``'s run of the example input (a run of its own without it); shape
    values at batch + 1 from :func:`.values.alt_batch_values` over the nodes that need them.
    """
    record = values_of(gm, shared)
    data_dependent: set[fx.Node] = set()
    wanted: list[fx.Node] = []
    for n in gm.graph.nodes:
        ni = node_info(n)
        if n.op == "placeholder":
            data_dependent.add(n)
            ni.value_kind = "tensor"
        elif n.op == "output":
            ni.value_kind = "other"
        elif record.holds_tensor.get(n, False):
            if any(node_info(a).value_kind == "tensor" and a in data_dependent for a in n.all_input_nodes):
                data_dependent.add(n)
                ni.value_kind = "tensor"
            else:
                ni.value_kind = "param"
        elif _is_shape_like(value := record.plain.get(n)) or value is None:
            depends_on_tensor = any(node_info(a).value_kind in ("tensor", "shape") for a in n.all_input_nodes)
            ni.value_kind = Layout.SHAPE if depends_on_tensor else Layout.CONST
            ni.shape_value = value
            wanted.append(n)
        else:
            ni.value_kind = "other"
    x = record.x
    alt = alt_batch_values(gm, x, wanted, record.flops) if x.dim() > 0 else {}
    for n in wanted:
        node_info(n).shape_value_alt_batch = alt.get(n)


def _tensor_meta_of(n: fx.Node) -> torch.Tensor | None:
    tm = n.meta.get("tensor_meta")
    return tm if hasattr(tm, "shape") else None


def _first_tensor_input(n: fx.Node) -> fx.Node | None:
    for a in n.all_input_nodes:
        if node_info(a).tensor is not None and node_info(a).value_kind == "tensor":
            return a
    return None


def _perm_of(n: fx.Node, rank: int) -> list[int] | None:
    """The dimension permutation a permute/transpose node applies, if it is one."""
    target = n.target
    args = list(n.args[1:])
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return [d % rank for d in dims] if all(isinstance(d, int) for d in dims) else None
    if name in ("transpose", "swapaxes") and len(args) >= 2 and all(isinstance(a, int) for a in args[:2]):
        a, b = args[0] % rank, args[1] % rank
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    return None


def _layout_by_rank(shape: tuple[int, ...]) -> TensorInfo:
    rank = len(shape)
    if rank == 4:
        return TensorInfo(shape, "", Layout.MAP)
    if rank == 3:
        n = shape[1]
        prefix = next((k for k in (0, 1, 2) if n - k > 0 and math.isqrt(n - k) ** 2 == n - k), 0)
        side = math.isqrt(n - prefix)
        return TensorInfo(shape, "", Layout.TOKENS, prefix, (side, side))
    if rank == 2:
        return TensorInfo(shape, "", Layout.FLAT)
    return TensorInfo(shape, "", Layout.OTHER)


def _infer_layout(n: fx.Node, shape: tuple[int, ...]) -> TensorInfo:
    """Layout of ``n``'s output from its op and its inputs' layouts (rank-based default)."""
    src = _first_tensor_input(n)
    src_info = node_info(src).tensor if src is not None else None
    rank = len(shape)
    if src_info is None:
        return _layout_by_rank(shape)
    target = n.target
    if target in _PERMUTE_TARGETS and (perm := _perm_of(n, len(src_info.shape))) is not None:
        if src_info.layout == Layout.MAP and perm == [0, 2, 3, 1]:
            return TensorInfo(shape, "", Layout.MAP_NHWC)
        if src_info.layout == Layout.MAP_NHWC and perm == [0, 3, 1, 2]:
            return TensorInfo(shape, "", Layout.MAP)
        if src_info.layout == Layout.OTHER and rank == 3 and perm == [0, 2, 1] and src_info.grid:
            return TensorInfo(shape, "", Layout.TOKENS, 0, src_info.grid)
        if src_info.layout == Layout.TOKENS and rank == 3 and perm == [0, 2, 1]:
            return TensorInfo(shape, "", Layout.OTHER, grid=src_info.grid)
        return TensorInfo(shape, "", Layout.OTHER) if rank not in (2,) else TensorInfo(shape, "", Layout.FLAT)
    if target in _RESHAPE_TARGETS:
        if src_info.layout == Layout.MAP and rank == 3 and shape[:2] == src_info.shape[:2]:
            # (B, C, H, W) -> (B, C, H*W): channels first, patch tokens along the last dim
            return TensorInfo(shape, "", Layout.OTHER, grid=tuple(src_info.shape[2:4]))
        if rank == 2:
            return TensorInfo(shape, "", Layout.FLAT)
        if src_info.layout == Layout.TOKENS and rank == 4:
            if shape[-1] == src_info.shape[-1] and shape[1] * shape[2] == src_info.shape[1] - src_info.prefix_tokens:
                return TensorInfo(shape, "", Layout.MAP_NHWC)
            return TensorInfo(shape, "", Layout.OTHER)
        if src_info.layout == Layout.TOKENS and rank == 3 and shape[-1] == src_info.shape[-1]:
            return TensorInfo(shape, "", Layout.TOKENS, src_info.prefix_tokens, src_info.grid)
    if target in (torch.cat, torch.concat) and rank == 3 and src_info.layout == Layout.TOKENS:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        if dim in (1, -2):
            prefix = 0
            for t in n.args[0]:
                tk = node_info(t).value_kind
                if tk == "param":
                    prefix += node_info(t).tensor.shape[1]
                else:
                    prefix += node_info(t).tensor.prefix_tokens if node_info(t).tensor.layout == Layout.TOKENS else 0
                    break
            return TensorInfo(shape, "", Layout.TOKENS, prefix, src_info.grid)
    if target is operator.getitem and src_info.layout == Layout.TOKENS and rank == 3:
        removed = src_info.shape[1] - shape[1]
        return TensorInfo(shape, "", Layout.TOKENS, max(0, src_info.prefix_tokens - removed), src_info.grid)
    if rank == len(src_info.shape) and src_info.layout != Layout.OTHER:
        same = tuple(shape) == tuple(src_info.shape)
        if same or src_info.layout in (Layout.MAP, Layout.MAP_NHWC, Layout.FLAT):
            prefix = src_info.prefix_tokens if same else 0
            return TensorInfo(shape, "", src_info.layout, prefix, src_info.grid if same else None)
        if src_info.layout == Layout.TOKENS and shape[1] == src_info.shape[1]:
            return TensorInfo(shape, "", Layout.TOKENS, src_info.prefix_tokens, src_info.grid)
    if src_info.layout == Layout.OTHER and rank == len(src_info.shape):
        return TensorInfo(shape, "", Layout.OTHER)
    return _layout_by_rank(shape)


def annotate_tensors(gm: fx.GraphModule) -> None:
    """Set ``node_info(n).tensor`` (shape, dtype, layout) for every tensor-valued node."""
    for n in gm.graph.nodes:
        ni = node_info(n)
        tm = _tensor_meta_of(n)
        if tm is None:
            ni.tensor = None
            continue
        shape = tuple(int(s) for s in tm.shape)
        if n.op == "placeholder" or ni.value_kind == "param":
            t = _layout_by_rank(shape) if n.op == "placeholder" else TensorInfo(shape, "", Layout.OTHER)
        else:
            t = _infer_layout(n, shape)
        t.dtype = str(tm.dtype).removeprefix("torch.")
        ni.tensor = t


class ShapePass(PassBase):
    """Annotate value kinds, shapes, dtypes and layouts (idempotent); ``shared``: the run to read values from."""

    def __init__(self, shared: SharedValues | None = None):
        super().__init__()
        self.shared = shared

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        classify_values(graph_module, self.shared)
        annotate_tensors(graph_module)
        return PassResult(graph_module, False)
