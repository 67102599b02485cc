"""Cut points: values through which every input-to-output data path passes.

The data-flow graph has one vertex per input-dependent tensor node (``value_kind ==
"tensor"``) and an edge for every tensor argument. Shape values (``x.shape``, ``size()``,
``numel``) are not edges: they are recomputed, never carried. The cut points are then the
dominators of the output in that graph (``networkx.immediate_dominators`` from the input)
that hold a single tensor, ordered input → output; the model input is cut point 0 and the returned tensor the last.

Between consecutive cut points lies one *segment*; ``segment_index`` assigns every node to
the segment whose computation needs it, which is what blocks and cumulative costs use.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from zoocompiler.core.errors import PassError
from zoocompiler.ir import Cost, TensorInfo, graph_info, input_node, node_info, output_value


def data_flow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """DiGraph over input-dependent tensor nodes (plus the output node), tensor edges only."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        if n.op == "output" or node_info(n).value_kind == "tensor":
            g.add_node(n.name)
            for a in n.all_input_nodes:
                if node_info(a).value_kind == "tensor":
                    g.add_edge(a.name, n.name)
    return g


def find_cut_points(gm: fx.GraphModule) -> list[str]:
    """Node names of the cut points, input first, the returned tensor last."""
    inp = input_node(gm)
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    g = data_flow_graph(gm)
    idom = nx.immediate_dominators(g, inp.name)
    if out.name not in idom:
        raise PassError("the output does not depend on the input", "check that the model uses its input")
    chain = []
    v = idom[out.name]
    while True:
        chain.append(v)
        if v == inp.name:
            break
        v = idom[v]
    chain.reverse()
    nodes = {n.name: n for n in gm.graph.nodes}
    # A dominator that yields a tuple (e.g. chunk) is not a boundary: blocks pass one tensor.
    chain = [c for c in chain if node_info(nodes[c]).tensor is not None]
    last = output_value(gm).name
    if chain[-1] != last and last in g and all(p == chain[-1] for p in g.predecessors(last)):
        chain.append(last)
    return chain


def segment_index(gm: fx.GraphModule) -> dict[str, int]:
    """Segment of every node: k means "between cut k-1 and cut k" (cut k itself is in k).

    Input-dependent nodes that reach the output are placed by graph order (valid because
    cut points dominate the output); other nodes (parameters, constants, shape values)
    go to the earliest segment that uses them. Nodes nothing needs are left out.
    Cached in ``graph_info(gm).extra["segments"]`` by the cut-point pass.
    """
    info = graph_info(gm)
    cached = info.extra.get("segments")
    if cached is not None and info.cut_points:
        return cached
    cuts = info.cut_points or find_cut_points(gm)
    pos = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    cut_pos = [pos[c] for c in cuts]
    g = data_flow_graph(gm)
    live = nx.ancestors(g, cuts[-1]) | {cuts[-1]}
    seg: dict[str, int] = {}
    k = 0
    for n in gm.graph.nodes:
        while k < len(cut_pos) - 1 and pos[n.name] > cut_pos[k]:
            k += 1
        if n.name in live:
            seg[n.name] = k if pos[n.name] > cut_pos[0] else 0
    for n in reversed(gm.graph.nodes):
        if n.name in seg or node_info(n).value_kind == "tensor" or n.op == "output":
            continue
        user_segs = [seg[u.name] for u in n.users if u.name in seg]
        if user_segs:
            seg[n.name] = min(user_segs)
    return seg


@dataclass
class CutPoint:
    """One row of the cut-point table: the value and the cost of everything before it."""

    index: int
    node: str
    tensor: TensorInfo
    cum_params: int
    cum_macs: int


def segment_costs(gm: fx.GraphModule) -> list[Cost]:
    """Cost of each segment (index k = the work between cut k-1 and cut k)."""
    cuts = graph_info(gm).cut_points or find_cut_points(gm)
    seg = segment_index(gm)
    costs = [Cost() for _ in cuts]
    for n in gm.graph.nodes:
        c = node_info(n).cost
        if c is not None and n.name in seg:
            costs[seg[n.name]] = costs[seg[n.name]] + c
    return costs


def cut_point_table(gm: fx.GraphModule) -> list[CutPoint]:
    """Cut points with their interface and the cumulative params/MACs up to each."""
    info = graph_info(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    rows = []
    cum = Cost()
    for i, (name, c) in enumerate(zip(info.cut_points, segment_costs(gm), strict=True)):
        cum = cum + c
        rows.append(CutPoint(i, name, node_info(nodes[name]).tensor, cum.params, cum.macs))
    return rows


class CutPointPass(PassBase):
    """Annotate ``graph_info(gm).cut_points`` and ``node_info(n).cut_index`` (idempotent)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        cuts = find_cut_points(graph_module)
        info = graph_info(graph_module)
        info.cut_points = cuts
        info.extra.pop("segments", None)
        info.extra["segments"] = segment_index(graph_module)
        index = {name: i for i, name in enumerate(cuts)}
        for n in graph_module.graph.nodes:
            node_info(n).cut_index = index.get(n.name)
        return PassResult(graph_module, False)


def _stack_block(node: fx.Node, stack: str, depth: int) -> int | None:
    """The block ``k`` of ``{stack}.{k}`` whose scope ``node`` was traced in (from fx's ``nn_module_stack``)."""
    scopes = (node.meta.get("nn_module_stack") or {}).values()
    paths = {s[0] if isinstance(s, tuple) else str(s) for s in scopes}
    return next((k for k in range(depth) if f"{stack}.{k}" in paths), None)


def stack_boundaries(gm: fx.GraphModule, stack: str, depth: int) -> list[int]:
    """Cut indices around the blocks ``{stack}.0 .. {stack}.{depth-1}`` of a module stack (e.g. a ViT's
    ``blocks``): ``[input of block 0, output of block 0, …, output of block depth-1]``, from the
    ``nn_module_stack`` fx records on each node. A block's output is the last node traced in its scope; a
    block whose output is not a cut point (a value computed inside it is used after it) is a ``PassError``."""
    cut_index = {name: i for i, name in enumerate(graph_info(gm).cut_points)}
    last: dict[int, fx.Node] = {}
    first_cut: int | None = None
    for n in gm.graph.nodes:
        k = _stack_block(n, stack, depth)
        if k is not None:
            last[k] = n
            if k == 0 and first_cut is None and n.name in cut_index:
                first_cut = cut_index[n.name]
    ends = []
    for k in range(depth):
        if k not in last or last[k].name not in cut_index:
            raise PassError(f"the output of block {stack}.{k} is not a cut point",
                            "use a uniform stack of residual blocks whose output is the only value carried on")
        ends.append(cut_index[last[k].name])
    if first_cut is None or ends != sorted(set(ends)):
        raise PassError(f"the blocks of {stack} do not follow each other in the graph", "use a sequential stack")
    return [first_cut - 1, *ends]
