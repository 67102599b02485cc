"""Blocks: the part of a model between two cut points, as a standalone GraphModule.

``extract_block(gm, start, end)`` copies the nodes of segments ``start+1 .. end`` into a
new graph whose single input stands for the ``start`` value and whose output is the
``end`` value. Parameters are shared with ``gm`` (no copies). Shape values computed before
``start`` are recomputed inside the block: a value that follows the batch size becomes
``input.size(0) * k``, any other becomes the constant it had at trace time (the block is
specialised to the traced non-batch shapes, like the model itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from zoocompiler.core.errors import PassError
from zoocompiler.ir import Cost, Layout, TensorInfo, graph_info, node_info

from ..analysis.cut_points import segment_index


@dataclass
class Block:
    """A standalone block and its interface."""

    module: fx.GraphModule
    start: str
    end: str
    start_index: int
    end_index: int
    input: TensorInfo
    output: TensorInfo
    cost: Cost

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _resolve_cut(gm: fx.GraphModule, cut: str | int) -> tuple[int, str]:
    cuts = graph_info(gm).cut_points
    if not cuts:
        raise PassError("graph has no cut points", "run zoocompiler.run_analysis(gm) first")
    if isinstance(cut, int):
        if not -len(cuts) <= cut < len(cuts):
            raise PassError(f"cut index {cut} out of range", f"use 0..{len(cuts) - 1}")
        cut = cut % len(cuts)
        return cut, cuts[cut]
    if cut not in cuts:
        raise PassError(f"'{cut}' is not a cut point", "pick a node from graph_info(gm).cut_points")
    return cuts.index(cut), cut


def _batch_linear(value: Any, alt: Any, batch: int) -> tuple[str, Any]:
    """Classify a shape value seen at batch b and b+1: ('const', v) or ('batch', k) for v = k*b."""
    if isinstance(value, bool) or not isinstance(value, int) or not isinstance(alt, int):
        return "const", value
    if value == alt:
        return "const", value
    step = alt - value
    if value == step * batch:
        return "batch", step
    raise PassError(
        f"shape value {value} depends on the batch size non-linearly",
        "make the block boundary later, after the value is recomputed",
    )


def _recompute_shape(graph: fx.Graph, x: fx.Node, n: fx.Node, batch: int) -> Any:
    """Emit nodes that rebuild the outer shape value of ``n`` from the block input ``x``."""
    ni = node_info(n)
    value, alt = ni.shape_value, ni.shape_value_alt_batch

    def one(v: Any, a: Any) -> Any:
        kind, k = _batch_linear(v, a, batch)
        if kind == "const":
            return v
        size = graph.call_method("size", (x, 0))
        return size if k == 1 else graph.call_function(_mul, (size, k))

    if isinstance(value, (tuple, list)) and isinstance(alt, (tuple, list)):
        items = [one(v, a) for v, a in zip(value, alt, strict=True)]
        if not any(isinstance(i, fx.Node) for i in items):
            return type(value)(items) if not isinstance(value, torch.Size) else tuple(items)
        return graph.call_function(_as_tuple, tuple(items))
    return one(value, alt)


def _mul(a: int, b: int) -> int:
    return a * b


def _as_tuple(*items: Any) -> tuple:
    return tuple(items)


torch.fx.wrap("_as_tuple")


def extract_block(gm: fx.GraphModule, start: str | int, end: str | int) -> Block:
    """Standalone block computing cut point ``end`` from cut point ``start`` (names or indices).

    The returned ``Block.module`` takes one tensor (the ``start`` value, any batch size) and
    returns the ``end`` value; parameters are shared with ``gm``.
    """
    s_idx, s_name = _resolve_cut(gm, start)
    e_idx, e_name = _resolve_cut(gm, end)
    if s_idx >= e_idx:
        raise PassError(f"block start '{s_name}' is not before end '{e_name}'", "pass cut points in model order")
    seg = segment_index(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    batch = int(graph_info(gm).example_input.shape[0])
    inside = {name for name, k in seg.items() if s_idx < k <= e_idx}

    graph = fx.Graph()
    x = graph.placeholder("x")
    env: dict[fx.Node, Any] = {nodes[s_name]: x}

    def lookup(a: fx.Node) -> Any:
        if a in env:
            return env[a]
        kind = node_info(a).value_kind
        if kind in (Layout.SHAPE,):
            env[a] = _recompute_shape(graph, x, a, batch)
            return env[a]
        if a.op == "get_attr" or kind in (Layout.CONST, "param"):
            for dep in a.all_input_nodes:
                lookup(dep)
            env[a] = graph.node_copy(a, lookup)
            return env[a]
        raise PassError(
            f"node '{a.name}' from before '{s_name}' is needed inside the block",
            "this should not happen for a cut point; please report the model",
        )

    outside_memo: dict[fx.Node, bool] = {}

    def reads_outside(a: fx.Node) -> bool:
        """Whether shape value ``a`` reads a tensor computed before ``start``."""
        if a not in outside_memo:
            kind = node_info(a).value_kind
            if kind == "tensor":
                outside_memo[a] = a.name != s_name and a.name not in inside
            elif kind == Layout.SHAPE:
                outside_memo[a] = any(reads_outside(i) for i in a.all_input_nodes)
            else:
                outside_memo[a] = False
        return outside_memo[a]

    for n in gm.graph.nodes:
        if n.name in inside and n not in env:
            if node_info(n).value_kind == Layout.SHAPE and reads_outside(n):
                env[n] = _recompute_shape(graph, x, n, batch)
            else:
                env[n] = graph.node_copy(n, lookup)
    graph.output(env[nodes[e_name]])
    module = fx.GraphModule(gm, graph, f"Block_{s_idx}_{e_idx}")
    module.graph.eliminate_dead_code()
    module.recompile()
    cost = Cost()
    for name in inside:
        c = node_info(nodes[name]).cost
        if c is not None:
            cost = cost + c
    return Block(
        module=module,
        start=s_name,
        end=e_name,
        start_index=s_idx,
        end_index=e_idx,
        input=node_info(nodes[s_name]).tensor,
        output=node_info(nodes[e_name]).tensor,
        cost=cost,
    )


def partition_blocks(gm: fx.GraphModule, boundaries: list[int]) -> list[Block]:
    """Blocks between consecutive cut indices ``boundaries`` (must start at 0 and end at the last cut)."""
    return [extract_block(gm, a, b) for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)]
