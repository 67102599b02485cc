"""Slice-and-Pack (paper 000, "Slicing the Network"): per-layer unit selection, repair layers, and the
fragment a selection cuts from a model through the prune and fuse passes.

* A *layer* is a producer of a prunable unit group (a :class:`~.mask_generators.GatePoint`), in graph
  order. :func:`slice_layers` says, per layer, how the units it drops are stood in for:
  *repaired* when its group has one producer and every value of the group leaves it only into conv
  (``groups=1``) or linear layers reading exactly the group's units (the *sites*): there a repair
  layer ``l_i`` (a linear map) predicts the dropped units from the kept ones; otherwise *zeroed*
  (residual groups, which the prune pass's ``pad`` strategy lays out, and the group feeding the
  classifier, which the fragment leaves out: its kept units are the fragment's features).
* :class:`SliceNet`: a copy of the model returning its *features* (the classifier's input), with a
  :class:`UnitGate` after each zeroed layer's gate point and a :class:`Repair` before each site. Each
  layer is switched between the original (``off``) and its repair ``r~`` (``on``); the per-layer
  outputs ``Z_i`` (at the gate point's probe) are captured for the ability-pooling loss.
* :func:`cut_fragment`: the fragment. Every repair becomes a real 1×1 conv / linear layer in front of
  its site (:func:`materialize_repairs`), the selection becomes a prune plan (``pad`` for residual
  groups), the pruned graph is truncated at the features and ``fuse`` folds every repair into its site
  (S&P's "fused into the next layer"). The fragment equals the :class:`SliceNet` with every layer on,
  restricted to the kept features (:attr:`Fragment.features`).

A repair carries a bias only when no site is a zero-padded conv: padding would see the bias, and the
fold would not be exact (the fuse pass refuses it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from zoocompiler.core.errors import PassError
from zoocompiler.ir import Layout, graph_info, node_info

from ..analysis import run_analysis
from ..analysis.plans import Plan, group_keys, producers
from ..analysis.unit_rules import op_name
from .fuse import fold_into, fuse
from .mask_generators import GatePoint, gate_points, module_plan
from .prune import build_pruned
from .prune_layout import old_shape

_REPAIR_PREFIX = "zc_repair_"
_GATE_PREFIX = "zc_unit_gate_"
_CAPTURE_PREFIX = "zc_capture_"


@dataclass(frozen=True)
class RepairSite:
    """A layer ``consumer`` reading the group's units from ``value`` along ``dim`` (conv: 1, linear: last)."""

    consumer: str
    value: str
    dim: int
    linear: bool


@dataclass(frozen=True)
class SliceLayer:
    """One S&P layer: its gate point, its repair sites (empty: dropped units are zeroed, ``zeroed`` says
    why) and whether its repair may carry a bias."""

    point: GatePoint
    sites: tuple[RepairSite, ...] = ()
    bias: bool = False
    zeroed: str | None = None

    @property
    def repaired(self) -> bool:
        return bool(self.sites)

    @property
    def units(self) -> int:
        return self.point.units


@dataclass
class SliceLayers:
    """The layers of a graph, its features node (the classifier's input) and the producers skipped."""

    layers: list[SliceLayer]
    features: str
    skipped: dict[str, str] = field(default_factory=dict)


def features_node(gm: fx.GraphModule) -> str:
    """The node feeding the classifier: the input of the last layer whose output is the model's output
    (through parameter-free ops only). Raises ``PassError`` when the output is not a linear classifier."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    node = out.args[0]
    while isinstance(node, fx.Node) and node.op in ("call_module", "call_function") and node.args:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        linear = isinstance(mod, nn.Linear) or (mod is None and op_name(node) == "linear")
        if linear and isinstance(node.args[0], fx.Node):
            return node.args[0].name
        if mod is None or any(True for _ in mod.parameters()) or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]  # a parameter-free module after the classifier (dropout, flatten, identity)
    raise PassError("the model's output is not a linear classifier on a feature vector",
                    "use a classifier whose last layer is an nn.Linear (its input is the fragment's features)")


def _is_shape_only(n: fx.Node) -> bool:
    return node_info(n).value_kind in (Layout.SHAPE, Layout.CONST) or (old_shape(n) is None and not n.users)


def _site(gm: fx.GraphModule, group, value: fx.Node, user: fx.Node, consumers: set[str]) -> RepairSite | None:
    """``user`` as a repair site of ``group`` reading ``value``, or None when it is not one."""
    if user.op != "call_module" or user.name not in consumers or not user.args or user.args[0] is not value:
        return None
    mod = gm.get_submodule(user.target)
    member = next((m for m in group.members if m.param is None and m.node == value.name), None)
    shape = old_shape(value)
    if member is None or shape is None:
        return None
    if [list(ix) for ix in member.indices] != [[u] for u in range(shape[member.dim])]:
        return None  # the value holds other groups' units too (a concat)
    if isinstance(mod, nn.Conv2d) and mod.groups == 1 and member.dim == 1:
        return RepairSite(user.name, value.name, 1, False)
    if isinstance(mod, nn.Linear) and member.dim == len(shape) - 1:
        return RepairSite(user.name, value.name, member.dim, True)
    return None


def _pads(gm: fx.GraphModule, site: RepairSite) -> bool:
    if site.linear:
        return False
    mod = gm.get_submodule(next(n for n in gm.graph.nodes if n.name == site.consumer).target)
    return isinstance(mod.padding, str) or any(int(p) for p in mod.padding)


def _repair_sites(
    gm: fx.GraphModule, group, features: str, order: dict[str, int]
) -> tuple[list[RepairSite], str | None]:
    """The sites of a single-producer group, or ``([], why)`` when its dropped units must be zeroed."""
    values = {m.node for m in group.members if m.param is None}
    consumers = {m.node for m in group.members if m.role in ("conv_in", "linear_in")}
    if features in values:
        return [], "its units are the fragment's features"
    nodes = {n.name: n for n in gm.graph.nodes}
    sites: list[RepairSite] = []
    for name in sorted(values, key=order.__getitem__):
        for user in nodes[name].users:
            if user.name in values or _is_shape_only(user):
                continue
            if order[user.name] > order[features]:
                return [], "it feeds the classifier the fragment leaves out"
            site = _site(gm, group, nodes[name], user, consumers)
            if site is None:
                return [], f"'{user.name}' reads its units and is not a conv/linear layer a repair can fold into"
            sites.append(site)
    if not sites:
        return [], "no layer reads its units"
    if len({s.dim for s in sites}) > 1:  # one Repair (one unit dim) stands in at every site
        return [], "its sites read its units along different dims (e.g. a conv and a linear on a permuted view)"
    return sites, None


def slice_layers(gm: fx.GraphModule) -> SliceLayers:
    """The S&P layers of an analysed classifier ``gm`` (see the module docstring). Raises ``PassError``
    when it has no prunable layer or no linear classifier."""
    features = features_node(gm)
    points = gate_points(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    groups = {g.gid: g for g in graph_info(gm).unit_groups}
    by_key = {key: groups[gid] for gid, key in group_keys(gm).items()}
    layers = []
    for p in points.points:
        group = by_key[p.group]
        if len(producers(group)) > 1:
            layers.append(SliceLayer(p, zeroed="residual group (pad: each producer keeps its own units)"))
            continue
        sites, why = _repair_sites(gm, group, features, order)
        bias = bool(sites) and not any(_pads(gm, s) for s in sites)
        layers.append(SliceLayer(p, tuple(sites), bias, why))
    return SliceLayers(layers, features, dict(points.skipped))


# ----------------------------------------------------------------------------- training-time modules


def _along(x: torch.Tensor, vec: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim % x.dim()] = -1
    return vec.view(shape)


class UnitGate(nn.Module):
    """Zeroes the dropped units (``keep`` 0) along ``dim`` while ``on``; the identity otherwise."""

    def __init__(self, units: int, dim: int):
        super().__init__()
        self.dim = dim
        self.on = False
        self.register_buffer("keep", torch.ones(units))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * _along(z, self.keep, self.dim) if self.on else z


class Repair(nn.Module):
    """The repair ``r~``: while ``on``, the dropped units of ``v`` (along ``dim``) are replaced by
    ``weight @ v_kept + bias``; kept units pass unchanged; the identity otherwise."""

    def __init__(self, units: int, dim: int, bias: bool):
        super().__init__()
        self.dim = dim
        self.on = False
        self.register_buffer("keep", torch.ones(units))
        self.weight = nn.Parameter(torch.zeros(units, units))
        self.bias = nn.Parameter(torch.zeros(units)) if bias else None

    def matrix(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(P, b)`` with ``repair(v) = P v + b`` along ``dim``: identity rows for kept units, the repair
        rows (reading kept units only) for dropped ones."""
        keep = self.keep
        drop = 1.0 - keep
        p = torch.diag(keep) + drop[:, None] * self.weight * keep[None, :]
        return p, None if self.bias is None else self.bias * drop

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return v
        p, b = self.matrix()
        out = torch.movedim(torch.movedim(v, self.dim, -1) @ p.T, -1, self.dim)
        return out if b is None else out + _along(out, b, self.dim)

    def rows(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` as ``[positions, units]`` (every sample and position a row)."""
        return torch.movedim(v, self.dim, -1).reshape(-1, v.shape[self.dim])

    @torch.no_grad()
    def fit(self, rows: torch.Tensor, ridge: float = 1e-3) -> float:
        """Least-squares fit of the dropped units from the kept ones on ``rows`` (:meth:`rows` of sample
        values; ridge ``ridge`` relative to the mean diagonal of the Gram matrix); returns the residual
        of the dropped units relative to their energy (0.0 when nothing is dropped)."""
        keep = self.keep.bool()
        rows = rows.double()
        a, y = rows[:, keep], rows[:, ~keep]
        if y.shape[1] == 0:
            return 0.0
        if self.bias is not None:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        gram = a.T @ a
        gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=a.dtype)
        coef = torch.linalg.solve(gram, a.T @ y)
        residual = float((a @ coef - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12))
        if self.bias is not None:
            self.bias.zero_()
            self.bias[~keep] = coef[-1].float()
            coef = coef[:-1]
        self.weight.zero_()
        self.weight[torch.nonzero(~keep)[:, 0][:, None], torch.nonzero(keep)[:, 0][None, :]] = coef.T.float()
        return residual


class Capture(nn.Module):
    """The identity; keeps its input in ``value`` while ``on`` (a layer's outputs ``Z_i``)."""

    def __init__(self):
        super().__init__()
        self.on = False
        self.value: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.on:
            self.value = z
        return z


def truncate_at(gm: fx.GraphModule, features: fx.Node | str) -> None:
    """Make ``gm`` return node ``features`` and drop what only the classifier used."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out.args = (features if isinstance(features, fx.Node) else next(n for n in gm.graph.nodes if n.name == features),)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _insert_before_site(gm: fx.GraphModule, nodes: dict[str, fx.Node], site: RepairSite, target: str) -> None:
    """Module ``target`` runs on what ``site``'s consumer reads, and the consumer reads its output."""
    consumer = nodes[site.consumer]
    with gm.graph.inserting_before(consumer):
        fixed = gm.graph.call_module(target, (consumer.args[0],))
    consumer.args = (fixed, *consumer.args[1:])


def _insert_after(gm: fx.GraphModule, node: fx.Node, target: str) -> fx.Node:
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


class SliceNet(nn.Module):
    """The model as S&P trains it: ``forward(x) -> features``, every layer switchable (``set_on``),
    with its selection (``set_keep``) and repair (``repair(i)``). Built by :func:`slice_net`."""

    def __init__(self, gm: fx.GraphModule, layers: SliceLayers):
        super().__init__()
        self.gm = gm
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)

    def gate(self, i: int) -> UnitGate | None:
        return None if self.layers.layers[i].repaired else self.gm.get_submodule(f"{_GATE_PREFIX}{i}")

    def repair(self, i: int) -> Repair | None:
        return self.gm.get_submodule(f"{_REPAIR_PREFIX}{i}") if self.layers.layers[i].repaired else None

    def capture(self, i: int) -> Capture:
        return self.gm.get_submodule(f"{_CAPTURE_PREFIX}{i}")

    def layer_parameters(self, i: int) -> list[nn.Parameter]:
        """The parameters of layer ``i``'s chain (the conv/linear and the norms right after it)."""
        from .prune_layout import node_params, producer_chains

        names = {q for c in producer_chains(self.gm, self.layers.layers[i].point.producer) for n in c
                 for q in node_params(self.gm, n)}
        params = dict(self.gm.named_parameters())
        return [params[q] for q in sorted(names) if q in params]

    @torch.no_grad()
    def set_keep(self, i: int, kept: Sequence[int]) -> None:
        keep = torch.zeros(self.layers.layers[i].units)
        keep[list(kept)] = 1.0
        for mod in (self.gate(i), self.repair(i)):
            if mod is not None:
                mod.keep.copy_(keep)

    def set_on(self, layers: Sequence[int] | range) -> None:
        """Turn the repairs of ``layers`` on and every other layer off."""
        wanted = set(layers)
        for i in range(len(self.layers.layers)):
            mod = self.gate(i) or self.repair(i)
            mod.on = i in wanted

    def kept(self, i: int) -> list[int]:
        mod = self.gate(i) or self.repair(i)
        return [int(u) for u in torch.nonzero(mod.keep)[:, 0]]


def slice_net(gm: fx.GraphModule, layers: SliceLayers | None = None) -> SliceNet:
    """A :class:`SliceNet` over a copy of the analysed classifier ``gm`` (``gm`` is not modified); every
    layer starts off, keeping all units, with a zero repair."""
    layers = layers or slice_layers(gm)
    new = copy.deepcopy(gm)
    nodes = {n.name: n for n in new.graph.nodes}
    features = nodes[layers.features]  # moves to what wraps it: a capture or gate after it is part of it

    def wrap(node: fx.Node, target: str) -> None:
        nonlocal features
        wrapped = _insert_after(new, node, target)
        if node is features:
            features = wrapped

    for i, layer in enumerate(layers.layers):
        p = layer.point
        new.add_submodule(f"{_CAPTURE_PREFIX}{i}", Capture())
        wrap(nodes[p.probe], f"{_CAPTURE_PREFIX}{i}")
        if layer.repaired:
            first = layer.sites[0]
            new.add_submodule(f"{_REPAIR_PREFIX}{i}", Repair(p.units, first.dim, layer.bias))
            for site in layer.sites:
                _insert_before_site(new, nodes, site, f"{_REPAIR_PREFIX}{i}")
        else:
            new.add_submodule(f"{_GATE_PREFIX}{i}", UnitGate(p.units, p.dim))
            for end in (p.end, *p.regate):
                wrap(nodes[end], f"{_GATE_PREFIX}{i}")
    new.graph.lint()
    new.recompile()
    truncate_at(new, features)
    return SliceNet(new, layers)


# ----------------------------------------------------------------------------- the fragment


def _plain_state(net: SliceNet) -> dict[str, torch.Tensor]:
    prefixes = (_REPAIR_PREFIX, _GATE_PREFIX, _CAPTURE_PREFIX)
    return {k: v for k, v in net.gm.state_dict().items() if not k.startswith(prefixes)}


Matrices = list[tuple[torch.Tensor, torch.Tensor | None] | None]  # per layer: a repair's (P, b), None: zeroed


@torch.no_grad()
def materialize_repairs(gm: fx.GraphModule, layers: SliceLayers, matrices: Matrices,
                        state: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """A re-analysed copy of ``gm`` (with ``state``'s weights when given), with each repaired layer's
    ``(P, b)`` (:meth:`Repair.matrix`) as a real 1×1 conv / linear layer in front of each of its sites."""
    new = copy.deepcopy(gm)
    if state is not None and new.load_state_dict(state, strict=False).unexpected_keys:  # the classifier is not in it
        raise PassError("the slice net's weights do not fit the model", "build the SliceNet from this model")
    nodes = {n.name: n for n in new.graph.nodes}
    for i, (layer, matrix) in enumerate(zip(layers.layers, matrices, strict=True)):
        if matrix is None:
            continue
        p, b = matrix
        for j, site in enumerate(layer.sites):
            u, has_bias = p.shape[0], b is not None
            mod: nn.Module = nn.Linear(u, u, bias=has_bias) if site.linear else nn.Conv2d(u, u, 1, bias=has_bias)
            mod.weight.copy_(p if site.linear else p[:, :, None, None])
            if b is not None:
                mod.bias.copy_(b)
            new.add_submodule(f"{_REPAIR_PREFIX}{i}_{j}", mod)
            _insert_before_site(new, nodes, site, f"{_REPAIR_PREFIX}{i}_{j}")
    new.graph.lint()
    new.recompile()
    return run_analysis(new)


@dataclass
class Fragment:
    """A cut fragment: ``module`` maps inputs to ``features`` (the kept feature positions of the
    :class:`SliceNet`'s output, along ``dim``); ``plan`` is the prune plan it was cut with."""

    module: fx.GraphModule
    features: list[int]
    dim: int
    plan: Plan
    repairs_left: int


def selection_plan(gm: fx.GraphModule, layers: SliceLayers, kept: Sequence[Sequence[int]]) -> Plan:
    """The prune plan keeping ``kept[i]`` units of each of ``layers`` on ``gm`` (their re-analysed
    :func:`materialize_repairs`; residual groups: ``pad``); repair layers keep all."""
    points = gate_points(gm)
    own = {layer.point.producer: list(k) for layer, k in zip(layers.layers, kept, strict=True)}
    missing = set(own) - {p.producer for p in points.points}
    if missing:
        raise PassError(f"layer '{sorted(missing)[0]}' has no gate point after its repairs were inserted",
                        "report this model: its repairs change the unit groups")
    plan = module_plan(gm, points, [own.get(p.producer, list(range(p.units))) for p in points.points], residual="pad")
    plan.meta["source"] = "pack"
    return plan


def _cut(gm: fx.GraphModule, materialized: fx.GraphModule, layers: SliceLayers,
         kept: Sequence[Sequence[int]]) -> Fragment:
    plan = selection_plan(materialized, layers, kept)
    pruned, layout, _, _ = build_pruned(materialized, plan)
    features = layers.features
    found = layout.values.get(features)
    shape = old_shape(next(n for n in gm.graph.nodes if n.name == features))
    dim, kept_features = found if found is not None else (len(shape) - 1, list(range(shape[-1])))
    truncate_at(pruned, features)
    fold_into(pruned, {site.consumer for layer in layers.layers for site in layer.sites})
    fused = fuse(pruned, analyze=False)  # the fragment is run and exported, not analysed again
    left = sum(1 for n in fused.graph.nodes if n.op == "call_module" and str(n.target).startswith(_REPAIR_PREFIX))
    return Fragment(fused.eval(), list(kept_features), int(dim), plan, left)


def cut_fragment(gm: fx.GraphModule, net: SliceNet) -> Fragment:
    """The fragment of ``net``'s current selection and repairs, cut from the analysed classifier ``gm``
    (see the module docstring): equal to ``net`` with every layer on, at :attr:`Fragment.features`."""
    layers = net.layers
    matrices = [None if net.repair(i) is None else net.repair(i).matrix() for i in range(len(layers.layers))]
    materialized = materialize_repairs(gm, layers, matrices, _plain_state(net))
    return _cut(gm, materialized, layers, [net.kept(i) for i in range(len(layers.layers))])


def fragment_structure(gm: fx.GraphModule, layers: SliceLayers, kept: Sequence[Sequence[int]]) -> fx.GraphModule:
    """A fragment of ``gm`` with ``kept`` units per layer and zero repairs: the structure :func:`cut_fragment`
    gives that selection, for weights stored elsewhere (a fragment store) to load into."""
    matrices: Matrices = []
    for layer, k in zip(layers.layers, kept, strict=True):
        if not layer.repaired:
            matrices.append(None)
            continue
        keep = torch.zeros(layer.units)
        keep[list(k)] = 1.0
        matrices.append((torch.diag(keep), torch.zeros(layer.units) if layer.bias else None))
    return _cut(gm, materialize_repairs(gm, layers, matrices), layers, kept).module
