"""What a plan does to every value and parameter: kept positions per dim, pad scatters, masked zeros.

:func:`compute_layout` turns a validated :class:`~.plans.Plan` into a :class:`PruneLayout`, shared by
the physical rewrite (``prune``) and its reference semantics (``masked_reference``):

* ``values`` / ``params``: for each value node (its unit dim) and parameter dim that loses positions,
  the old positions that stay;
* ``pre_values`` and ``scatters`` (``pad`` only): nodes of a producer's chain (the layer that creates
  the units plus the norms right after it) keep the producer's own units; a scatter after the chain
  maps them into the group's union space (zeros elsewhere);
* ``zero``: parameter positions the masked reference zeroes (removed units at every producer and
  consumer member; for ``pad`` also, per producer, the union units it does not keep).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from zoocompiler.ir import graph_info

from ..analysis.plans import Plan, group_keys, resolved_keep
from ..analysis.unit_groups import group_approx
from ..analysis.unit_rules import op_name

_NORM_FUNCTIONS = {"batch_norm", "group_norm", "layer_norm", "instance_norm"}
_LAYER_FUNCTIONS = {"conv1d", "conv2d", "conv3d", "linear", "embedding"}
_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Scatter:
    """Pad: after node ``after``, output position ``j`` along ``dim`` is input position ``index[j]``
    (``index[j] == pre_size``: a zero)."""

    after: str
    dim: int
    index: list[int]
    pre_size: int


@dataclass
class PruneLayout:
    values: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    pre_values: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    params: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    scatters: list[Scatter] = field(default_factory=list)
    zero: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    groups: dict[str, dict[str, object]] = field(default_factory=dict)  # key -> kept, size, strategy[, approx]


def old_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Shape of a node's tensor value in the traced graph (None for non-tensors)."""
    tm = node.meta.get("tensor_meta")
    return tuple(int(s) for s in tm.shape) if hasattr(tm, "shape") else None


def tensor_of(gm: nn.Module, name: str) -> torch.Tensor:
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return gm.get_buffer(name)


def set_tensor(gm: nn.Module, name: str, t: torch.Tensor) -> str:
    """Replace the parameter or buffer ``name`` of ``gm`` by ``t`` (a parameter stays a parameter, with its
    ``requires_grad``); returns the owning module's path."""
    owner, _, attr = name.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=mod._parameters[attr].requires_grad)
    else:
        mod._buffers[attr] = t
    return owner


def _zero_fills_zero(m: nn.Module) -> bool:
    """A norm module whose output is exactly 0 where its affine weight and bias are 0."""
    act = getattr(m, "act", None)
    if act is None:
        return True
    with torch.no_grad():
        return bool((act(torch.zeros(4)) == 0).all()) and not any(True for _ in act.parameters())


def _is_norm_call(gm: fx.GraphModule, n: fx.Node, src: fx.Node) -> bool:
    if not n.args or n.args[0] is not src:
        return False
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
        return isinstance(m, norms) and _zero_fills_zero(m)
    return n.op == "call_function" and op_name(n) in _NORM_FUNCTIONS


def node_params(gm: fx.GraphModule, n: fx.Node) -> set[str]:
    """Qualified names of the parameters and buffers a node reads (module state or get_attr inputs)."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return {f"{n.target}.{k}" for k, _ in [*m.named_parameters(), *m.named_buffers()]}
    names = {a.target for a in n.all_input_nodes if a.op == "get_attr"}
    return names | ({n.target} if n.op == "get_attr" else set())


def producer_chains(gm: fx.GraphModule, weight: str) -> list[list[fx.Node]]:
    """For each node computing with producer ``weight``: that node plus the norms that follow it
    (each the sole user of the previous node)."""
    owner = weight.rpartition(".")[0]
    starts = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == owner]
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == weight:
            starts += [u for u in n.users if u.op == "call_function" and op_name(u) in _LAYER_FUNCTIONS]
    chains = []
    for start in starts:
        chain = [start]
        while len(chain[-1].users) == 1:
            user = next(iter(chain[-1].users))
            if not _is_norm_call(gm, user, chain[-1]):
                break
            chain.append(user)
        chains.append(chain)
    return chains


def _add(acc: dict, key: tuple, positions: list[int]) -> None:
    acc.setdefault(key, set()).update(positions)


def _positions(indices: list[list[int]], units: set[int]) -> list[int]:
    return [p for u in units for p in indices[u]]


def _kept(size: int, removed: set[int]) -> list[int]:
    return [p for p in range(size) if p not in removed]


def compute_layout(gm: fx.GraphModule, plan: Plan) -> PruneLayout:
    """The layout of ``plan`` on ``gm`` (the plan must have passed ``validate_plan``)."""
    keys = group_keys(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    removed_val: dict[tuple[str, int], set[int]] = {}
    extra_val: dict[tuple[str, int], set[int]] = {}
    removed_par: dict[tuple[str, int], set[int]] = {}
    zero: dict[tuple[str, int], set[int]] = {}
    chain_ends: set[str] = set()
    out = PruneLayout()
    for g in graph_info(gm).unit_groups:
        key = keys[g.gid]
        if key not in plan.keep and key not in plan.producer_keep:
            continue
        keep = resolved_keep(g, key, plan)
        strategy = plan.strategy_for(key)
        out.groups[key] = {"kept": len(keep), "size": g.size, "strategy": strategy}
        if group_approx(g) is not None:
            out.groups[key]["approx"] = group_approx(g)
        gone = set(range(g.size)) - set(keep)
        for m in g.members:
            pos = _positions(m.indices, gone)
            if m.param is None:
                _add(removed_val, (m.node, m.dim), pos)
            else:
                _add(removed_par, (m.param, m.dim), pos)
                _add(zero, (m.param, m.dim), pos)
        if strategy != "pad" or key not in plan.producer_keep:
            continue
        for weight, own in plan.producer_keep[key].items():
            extra = set(keep) - set(own)
            if not extra:
                continue
            for chain in producer_chains(gm, weight):
                names = {n.name for n in chain}
                params = set().union(*(node_params(gm, n) for n in chain))
                chain_ends.add(chain[-1].name)
                for m in g.members:
                    pos = _positions(m.indices, extra)
                    if m.param is None and m.node in names:
                        _add(extra_val, (m.node, m.dim), pos)
                    elif m.param in params:
                        _add(removed_par, (m.param, m.dim), pos)
                        _add(zero, (m.param, m.dim), pos)
    for (name, dim), removed in removed_val.items():
        out.values[name] = (dim, _kept(old_shape(nodes[name])[dim], removed))
    for (name, dim), extra in extra_val.items():
        removed = removed_val.get((name, dim), set()) | extra
        out.pre_values[name] = (dim, _kept(old_shape(nodes[name])[dim], removed))
    for (param, dim), removed in removed_par.items():
        if removed:
            size = tensor_of(gm, param).shape[dim]
            out.params.setdefault(param, {})[dim] = _kept(size, removed)
    for (param, dim), positions in zero.items():
        if positions and param.rpartition(".")[2] not in _NORM_STATS:
            out.zero.setdefault(param, {})[dim] = sorted(positions)
    for end in sorted(chain_ends, key=list(nodes).index):
        out.scatters.append(_scatter(nodes[end], out))
    return out


def _scatter(node: fx.Node, layout: PruneLayout) -> Scatter:
    shape = old_shape(node)
    dim, pre = layout.pre_values.get(node.name, (None, None))
    if pre is None:  # the producer's units do not reach this value: nothing to scatter
        dim = layout.values.get(node.name, (0, None))[0]
        pre = layout.values.get(node.name, (dim, list(range(shape[dim]))))[1]
    post = layout.values.get(node.name, (dim, list(range(shape[dim]))))[1]
    rank = {p: i for i, p in enumerate(pre)}
    return Scatter(node.name, dim, [rank.get(q, len(pre)) for q in post], len(pre))
