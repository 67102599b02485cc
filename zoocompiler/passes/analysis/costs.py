"""Per-node cost: parameters, MACs, output activation bytes.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` run around each node, so the
counting rules are PyTorch's own (convolutions, matmuls, attention; element-wise ops,
norms and pooling count zero there, and here). MACs = FLOPs / 2. Parameters are counted
once each: a ``call_module`` node owns its module's parameters, a ``get_attr`` node the
parameter it reads (shared parameters go to the first node that uses them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.flop_counter import FlopCounterMode

from zoocompiler.core.errors import PassError
from zoocompiler.ir import Cost, graph_info, node_info


class _FlopRecorder(fx.Interpreter):
    """Interpreter that runs each node under its own FlopCounterMode."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops: dict[str, int] = {}
        self.act_bytes: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        self.flops[n.name] = int(counter.get_total_flops())
        self.act_bytes[n.name] = _tensor_bytes(result) if n.op not in ("get_attr", "output") else 0
        return result


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


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


def annotate_costs(gm: fx.GraphModule) -> Cost:
    """Set ``node_info(n).cost`` on every node and return the model total."""
    x = graph_info(gm).example_input
    if x is None:
        raise PassError("graph has no example input", "trace it with zoocompiler.trace(model, example_input)")
    recorder = _FlopRecorder(gm)
    with torch.no_grad():
        recorder.run(x)
    seen: set[int] = set()
    total = Cost()
    for n in gm.graph.nodes:
        cost = Cost(
            params=_owned_params(gm, n, seen),
            macs=recorder.flops.get(n.name, 0) // 2,
            act_bytes=recorder.act_bytes.get(n.name, 0),
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
    """Annotate per-node params, MACs and activation bytes (idempotent)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        annotate_costs(graph_module)
        return PassResult(graph_module, False)
