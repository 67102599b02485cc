"""Per-node cost: parameters, MACs, output activation bytes.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, read before and after each node of
one run (:mod:`.values`), so the counting rules are PyTorch's own (convolutions, matmuls, attention; element-wise ops,
norms and pooling count zero there, and here). MACs = FLOPs / 2. Parameters are counted
once each: a ``call_module`` node owns its module's parameters, a ``get_attr`` node the
parameter it reads (shared parameters go to the first node that uses them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from zoocompiler.ir import Cost, node_info

from .values import SharedValues, values_of


def _owned_params(gm: fx.GraphModule, n: fx.Node, seen: set[int]) -> int:
    tensors: list[torch.Tensor] = []
    if n.op == "call_module":
        tensors = list(gm.get_submodule(n.target).parameters())
    elif n.op == "get_attr":
        obj: Any = gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.nn.Parameter):
            tensors = [obj]
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def annotate_costs(gm: fx.GraphModule, shared: SharedValues | None = None) -> Cost:
    """Set ``node_info(n).cost`` on every node and return the model total (FLOPs and bytes from ``shared``'s
    run of the example input, or from a run of its own)."""
    record = values_of(gm, shared)
    seen: set[int] = set()
    total = Cost()
    for n in gm.graph.nodes:
        cost = Cost(
            params=_owned_params(gm, n, seen),
            macs=record.flops.get(n, 0) // 2,
            act_bytes=record.act_bytes.get(n, 0),
        )
        node_info(n).cost = cost
        total = total + cost
    return total


def total_cost(gm: fx.GraphModule) -> Cost:
    """Sum of the node costs (annotating first if the cost pass has not run)."""
    nodes = list(gm.graph.nodes)
    if any(node_info(n).cost is None for n in nodes):
        return annotate_costs(gm)
    total = Cost()
    for n in nodes:
        total = total + node_info(n).cost
    return total


class CostPass(PassBase):
    """Annotate per-node params, MACs and activation bytes (idempotent); ``shared``: the run to read."""

    def __init__(self, shared: SharedValues | None = None):
        super().__init__()
        self.shared = shared

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        annotate_costs(graph_module, self.shared)
        return PassResult(graph_module, False)
