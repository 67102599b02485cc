"""Modularizing while Training (paper 004, Fig. 2): mask generators on every producer of every prunable
unit group, kernel probes for standard models, and per-class module extraction through the prune pass.

* :func:`gate_points` (analysis, no rewrite): one :class:`GatePoint` per producer (conv filters, linear
  neurons) of each prunable group: where its mask is computed (the layer's input) and where it
  multiplies (the end of the layer's chain: the layer plus the norms right after it). A channel-wise
  layer of a single-producer group outside that chain (a depthwise conv, a norm after an activation) is
  *re-gated* with the same mask after its own chain, so a masked-out channel stays 0 through its bias. A
  multi-producer group with such a layer (a depthwise conv on a residual stream) gets no gates (listed in
  ``skipped``): no single mask could re-gate it. Nor does a group where any other op can turn a masked 0
  into a non-zero that a consumer reads (a sigmoid after the norm, a parameter added to a channel:
  :func:`_first_unclean`). Input and classifier (pinned groups) are never gated.
* :func:`insert_mask_generators`: a :class:`ModularNet` whose graph returns ``(logits, masks)``,
  ``masks`` the per-sample masks of every gate point concatenated ``[B, kernels]``, values in [0, 1).
  With every mask 1 it computes the original model.
* :func:`insert_kernel_probes`: the standard model returning ``(logits, activity)``; a kernel is active
  for a sample when its output (after a following ReLU) has a non-zero element (paper §4.2).
* :func:`module_plan` + :func:`extract_module`: a per-class (or mixed) module. Every producer keeps its
  own kernels; multi-producer groups (residual adds) use the prune pass's ``pad`` strategy (or ``union``).
  ``static`` drops the generators (the paper's modules); ``gated`` keeps them on the kept kernels, so the
  module equals the modular model with that module's binary mask applied (:meth:`ModularNet.set_module_mask`)
  (gate points only gate groups where that holds; the pipelines also check it numerically and refuse
  otherwise); ``calibrated`` is static with each kernel scaled by its mean mask.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from zoocompiler.core.errors import PassError
from zoocompiler.core.modules import eval_mode
from zoocompiler.ir import graph_info, node_info, output_value

from ..analysis.plans import Plan, group_keys, producers, validate_plan
from ..analysis.unit_rules import op_name
from .prune import build_pruned
from .prune_layout import PruneLayout, node_params, old_shape, producer_chains

SEMANTICS = ("gated", "static", "calibrated")
RESIDUAL_LAYOUTS = ("pad", "union")
MAX_HIDDEN = 128  # hidden width of a generator: min(kernels, MAX_HIDDEN) keeps wide layers' generators small
_RELU_FUNCTIONS = {"relu", "relu_", "relu6", "hardtanh"}
_CHANNELWISE_ROLES = ("conv_dw", "norm")  # members that compute per unit from a bias: f(0) != 0


@dataclass(frozen=True)
class GatePoint:
    """One producer's gate: generator input ``source`` (the producer ``layer``'s input, channels on
    ``in_dim``), mask applied after ``end`` (and after each of ``regate``) along ``dim``; ``units`` kernels.
    ``probe``: the value whose non-zeros mark active kernels in the standard model."""

    producer: str
    group: str
    layer: str
    source: str
    end: str
    dim: int
    units: int
    in_dim: int
    in_channels: int
    probe: str
    regate: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GatePoints:
    """The gate points of a graph and the producers of prunable groups that got none (with why)."""

    points: list[GatePoint] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def kernels(self) -> int:
        return sum(p.units for p in self.points)

    def offsets(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of every point in the concatenated mask vector."""
        out, start = [], 0
        for p in self.points:
            out.append((start, start + p.units))
            start += p.units
        return out


def _value_member(group, node: str):
    return next((m for m in group.members if m.param is None and m.node == node), None)


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), (nn.ReLU, nn.ReLU6))
    return n.op in ("call_function", "call_method") and op_name(n) in _RELU_FUNCTIONS


def _in_dim(gm: fx.GraphModule, layer: fx.Node) -> int | None:
    kind = type(gm.get_submodule(layer.target)) if layer.op == "call_module" else None
    name = op_name(layer) if layer.op == "call_function" else ""
    if (kind is not None and issubclass(kind, nn.modules.conv._ConvNd)) or name.startswith("conv"):
        return 1
    if kind is nn.Linear or name == "linear":
        return -1
    return None


def _holds_only(group, node: fx.Node) -> bool:
    """``node``'s value carries exactly the group's units, one position each, in order, on its unit dim."""
    member, shape = _value_member(group, node.name), old_shape(node)
    return (member is not None and shape is not None
            and [list(ix) for ix in member.indices] == [[u] for u in range(shape[member.dim])])


def _loose_channelwise_ends(gm: fx.GraphModule, group, chain_params: set[str]) -> list[str]:
    """Chain ends of the group's channel-wise layers outside every producer chain (a depthwise conv, a norm
    after an activation): they turn a masked 0 into a non-zero, so they must be re-gated."""
    ends: list[str] = []
    for m in group.members:
        if m.role in _CHANNELWISE_ROLES and m.param is not None and m.param not in chain_params:
            ends += [c[-1].name for c in producer_chains(gm, m.param) if c[-1].name not in ends]
    return ends


_MUL = {"mul", "mul_", "__mul__"}


def _probe_value(gm: fx.GraphModule, a: fx.Node, zero: set[str], probed: dict[str, Any]) -> Any:
    """A stand-in for node ``a`` when probing an op: zeros for the group's clean values, ones for any other
    tensor (conservative), the probed output of a clean tuple, the parameter for ``get_attr``, the recorded
    value for shape nodes."""
    if a.name in probed:
        return probed[a.name]
    if a.op == "get_attr":
        return functools.reduce(getattr, a.target.split("."), gm)
    shape = old_shape(a)
    if shape is not None:
        return torch.zeros(shape) if a.name in zero else torch.ones(shape)
    value = node_info(a).shape_value
    if value is None:
        raise LookupError(a.name)
    return value


@torch.no_grad()
def _probe(gm: fx.GraphModule, n: fx.Node, zero: set[str], probed: dict[str, Any]) -> Any:
    """Run op ``n`` on stand-ins (:func:`_probe_value`); None when it cannot be run that way."""
    try:
        args = fx.node.map_arg(n.args, lambda a: _probe_value(gm, a, zero, probed))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: _probe_value(gm, a, zero, probed))
        if n.op == "call_module":
            with eval_mode(gm.get_submodule(n.target)):
                return gm.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - an op we cannot probe is not known to keep zeros
        return None


def _zero_at(out: Any, member) -> bool:
    """``out`` (a probe's output) is 0 at the positions of the group's units (``member``: its value member)."""
    if not isinstance(out, torch.Tensor):
        return False
    positions = torch.tensor([p for ix in member.indices for p in ix], dtype=torch.long)
    return not bool(out.index_select(member.dim, positions).ne(0).any())


def _first_unclean(gm: fx.GraphModule, group, gated_ends: set[str], chain_nodes: set[str]) -> str | None:
    """The first value of ``group`` that can be non-zero at a unit all its gates zeroed and that a consumer
    outside the group's values reads, or None when masked units stay 0 up to every consumer. Multiplies are
    clean when one factor is; any other op when its inputs are and a probe maps zeros to zeros there;
    tuples (split, unbind) pass through when every tensor in them is clean."""
    members = {m.node: m for m in group.members if m.param is None}
    clean: set[str] = set()
    probed: dict[str, Any] = {}
    for n in gm.graph.nodes:
        if n.name in gated_ends:
            clean.add(n.name)
            continue
        if n.name in chain_nodes or n.op in ("placeholder", "get_attr", "output"):
            continue
        inputs = [a for a in n.all_input_nodes if a.name in members or a.name in probed]
        if n.name not in members:
            if inputs and old_shape(n) is None and all(a.name in clean for a in inputs):  # a tuple of clean values
                out = _probe(gm, n, clean, probed)
                if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
                    probed[n.name] = out
                    clean.add(n.name)
            continue
        name = op_name(n) if n.op != "call_module" else ""
        if inputs and n.op in ("call_function", "call_method") and name in _MUL:
            ok = any(a.name in clean for a in inputs)
        else:
            ok = (bool(inputs) and all(a.name in clean for a in inputs)
                  and _zero_at(_probe(gm, n, clean, probed), members[n.name]))
        if ok:
            clean.add(n.name)
        elif any(u.name not in members and u.name not in probed for u in n.users) or not n.users:
            return n.name
    return None


def gate_points(gm: fx.GraphModule) -> GatePoints:
    """Where the mask generators of an analysed ``gm`` go (see the module docstring). Raises ``PassError``
    when no prunable group has a gateable producer."""
    keys = group_keys(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    found = GatePoints()
    for g in graph_info(gm).unit_groups:
        if not g.prunable:
            continue
        owners = producers(g)
        chain_params = {q for w in owners for c in producer_chains(gm, w) for n in c for q in node_params(gm, n)}
        loose = _loose_channelwise_ends(gm, g, chain_params)
        mixed = [e for e in loose if not _holds_only(g, nodes[e])]
        if (loose and len(owners) > 1) or mixed:
            why = (f"'{mixed[0]}' holds other groups' units too" if mixed else
                   f"'{loose[0]}' re-creates the merged units of several producers")
            for weight in owners:
                found.skipped[weight] = f"{why} (no single mask can re-gate it)"
            continue
        chains_of = {w: producer_chains(gm, w) for w in owners}
        chain_nodes = {n.name for cs in chains_of.values() for c in cs for n in c}
        ends = {c[-1].name for cs in chains_of.values() for c in cs} | set(loose)
        unclean = _first_unclean(gm, g, ends, chain_nodes)
        if unclean is not None:
            for weight in owners:
                found.skipped[weight] = f"'{unclean}' can turn a masked-out 0 into a non-zero that a consumer reads"
            continue
        for weight in owners:
            chains = chains_of[weight]
            if len(chains) != 1:
                found.skipped[weight] = f"its layer runs {len(chains)} times"
                continue
            chain = chains[0]
            layer, end = chain[0], chain[-1]
            member = _value_member(g, end.name)
            shape, in_dim = old_shape(end), _in_dim(gm, layer)
            source = layer.args[0] if layer.args and isinstance(layer.args[0], fx.Node) else None
            if member is None or shape is None or in_dim is None or source is None or old_shape(source) is None:
                found.skipped[weight] = "not a conv/linear layer on one tensor"
                continue
            if not _holds_only(g, end):
                found.skipped[weight] = "its output holds other groups' units too"
                continue
            users = list(end.users)
            probe = users[0].name if len(users) == 1 and _is_relu(gm, users[0]) else end.name
            in_shape = old_shape(source)
            found.points.append(GatePoint(
                producer=weight, group=keys[g.gid], layer=layer.name, source=source.name, end=end.name,
                dim=member.dim, units=shape[member.dim], in_dim=in_dim % len(in_shape),
                in_channels=in_shape[in_dim], probe=probe, regate=tuple(loose),
            ))
    if not found.points:
        raise PassError("the model has no prunable conv/linear group to modularize",
                        "use a model with prunable layers (see `zoocompile inspect SPEC`: unit groups)")
    order = {name: i for i, name in enumerate(nodes)}
    found.points.sort(key=lambda p: order[p.layer])
    return found


# ----------------------------------------------------------------------------- generators and gates


class MaskGenerator(nn.Module):
    """Input average-pooled to its channels → Linear → ReLU → Linear (bias 1) → Tanh → ReLU: a mask in
    [0, 1) per sample and kernel, times the buffer ``module_mask`` (all ones until a module mask is set).
    Weights are He-initialised: near-identical initial masks are a stationary point of the coupling loss
    (the price: a few kernels start closed for some samples)."""

    def __init__(self, in_channels: int, units: int, in_dim: int = 1, hidden: int | None = None):
        super().__init__()
        hidden = hidden or min(units, MAX_HIDDEN)
        self.in_dim = in_dim
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, units)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")  # He init: masks start diverse enough
        nn.init.kaiming_normal_(self.fc2.weight, nonlinearity="relu")  # for the coupling loss to separate them
        nn.init.constant_(self.fc2.bias, 1.0)
        self.register_buffer("module_mask", torch.ones(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(1, x.dim()) if d != self.in_dim]
        pooled = x.mean(dims) if dims else x
        return F.relu(torch.tanh(self.fc2(F.relu(self.fc1(pooled))))) * self.module_mask

    @torch.no_grad()
    def restricted(self, kept_in: Sequence[int] | None, kept_out: Sequence[int] | None) -> MaskGenerator:
        """A copy reading only input channels ``kept_in`` and producing only kernels ``kept_out`` (None: all)."""
        new = copy.deepcopy(self)
        if kept_in is not None:
            idx = torch.tensor(list(kept_in), dtype=torch.long)
            new.fc1.weight = nn.Parameter(self.fc1.weight[:, idx].clone())
            new.fc1.in_features = len(idx)
        if kept_out is not None:
            idx = torch.tensor(list(kept_out), dtype=torch.long)
            new.fc2.weight = nn.Parameter(self.fc2.weight[idx].clone())
            new.fc2.bias = nn.Parameter(self.fc2.bias[idx].clone())
            new.fc2.out_features = len(idx)
            new.module_mask = self.module_mask[idx].clone()
        return new


def apply_mask(y: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``y`` times a per-sample mask ``[B, K]`` broadcast along ``y``'s unit dim ``dim`` (static shapes)."""
    dim = dim % y.dim()
    for d in range(1, y.dim()):
        if d != dim:
            mask = mask.unsqueeze(d)
    return y * mask


def unit_activity(v: torch.Tensor, dim: int) -> torch.Tensor:
    """1.0 where a unit of ``v`` (units on ``dim``) has a non-zero element for that sample, else 0.0: ``[B, K]``."""
    moved = v.detach().movedim(dim % v.dim(), 1)
    return (moved.reshape(moved.shape[0], moved.shape[1], -1) != 0).any(-1).to(v.dtype)


def _generator_name(i: int) -> str:
    return f"zc_mask_{i}"


def _insert_gates(gm: fx.GraphModule, points: Sequence[GatePoint], generators: Sequence[nn.Module]) -> list[fx.Node]:
    """Add each generator as a submodule and multiply its mask in after the point's end(s); the mask nodes."""
    nodes = {n.name: n for n in gm.graph.nodes}
    masks = []
    for i, (p, gen) in enumerate(zip(points, generators, strict=True)):
        gm.add_submodule(_generator_name(i), gen)
        layer = nodes[p.layer]
        with gm.graph.inserting_before(layer):
            mask = gm.graph.call_module(_generator_name(i), (layer.args[0],))
        for end_name in (p.end, *p.regate):
            end = nodes[end_name]
            with gm.graph.inserting_after(end):
                gated = gm.graph.call_function(apply_mask, (end, mask, p.dim))
            end.replace_all_uses_with(gated, delete_user_cb=lambda u, keep=gated: u is not keep)
        masks.append(mask)
    return masks


def _return_with(gm: fx.GraphModule, extra: list[fx.Node]) -> None:
    """Make ``gm`` return ``(logits, cat(extra, 1))``."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    logits = output_value(gm)
    with gm.graph.inserting_before(out):
        joined = gm.graph.call_function(torch.cat, (list(extra), 1))
    out.args = ((logits, joined),)
    gm.graph.lint()
    gm.recompile()


class ModularNet(nn.Module):
    """A modular model: ``forward(x) -> (logits, masks [B, kernels])``; the generators are ``gm.zc_mask_<i>``."""

    def __init__(self, gm: fx.GraphModule, points: GatePoints):
        super().__init__()
        self.gm = gm
        self.points = points

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gm(x)

    def generators(self) -> list[MaskGenerator]:
        return [self.gm.get_submodule(_generator_name(i)) for i in range(len(self.points.points))]

    @torch.no_grad()
    def set_module_mask(self, mask: torch.Tensor | None) -> None:
        """Apply a binary module mask (``[kernels]``, the concatenated per-point masks); None: all ones."""
        for gen, (a, b) in zip(self.generators(), self.points.offsets(), strict=True):
            gen.module_mask.copy_(torch.ones(b - a) if mask is None else mask[a:b].to(gen.module_mask.dtype))


def insert_mask_generators(gm: fx.GraphModule, points: GatePoints | None = None, *, seed: int = 0) -> ModularNet:
    """A :class:`ModularNet` over a copy of the analysed ``gm`` (generators initialised from ``seed``;
    ``gm`` is not modified)."""
    points = points or gate_points(gm)
    new = copy.deepcopy(gm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gens = [MaskGenerator(p.in_channels, p.units, p.in_dim) for p in points.points]
    _return_with(new, _insert_gates(new, points.points, gens))
    return ModularNet(new, points)


def insert_kernel_probes(gm: fx.GraphModule, points: GatePoints | None = None) -> fx.GraphModule:
    """A copy of ``gm`` returning ``(logits, activity [B, kernels])`` (see :func:`unit_activity`);
    ``gm``'s parameters are shared, so training the copy trains ``gm``."""
    points = points or gate_points(gm)
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    nodes = {n.name: n for n in new.graph.nodes}
    out = next(n for n in reversed(new.graph.nodes) if n.op == "output")
    probes = []
    with new.graph.inserting_before(out):
        for p in points.points:
            probes.append(new.graph.call_function(unit_activity, (nodes[p.probe], p.dim)))
    _return_with(new, probes)
    return new


def plain_state(modular: ModularNet) -> dict[str, torch.Tensor]:
    """The modular model's weights without its generators: loads into the analysed original graph."""
    prefix = "zc_mask_"
    return {k: v for k, v in modular.gm.state_dict().items() if not k.startswith(prefix)}


# ----------------------------------------------------------------------------- modules


def _rounded(units: list[int], size: int, round_to: int, score: np.ndarray | None) -> list[int]:
    """``units`` grown to a multiple of ``round_to`` (at most ``size``) by the highest-``score`` others."""
    want = min(size, -(-len(units) // round_to) * round_to)
    others = sorted(set(range(size)) - set(units), key=lambda u: (-float(score[u]) if score is not None else 0.0, u))
    return sorted(units + others[: max(0, want - len(units))])


def module_plan(
    gm: fx.GraphModule,
    points: GatePoints,
    kept: Sequence[Sequence[int]],
    *,
    residual: str = "pad",
    round_to: int = 1,
    scores: Sequence[np.ndarray] | None = None,
) -> Plan:
    """The prune plan keeping ``kept[i]`` kernels of gate point ``i``. Single-producer groups keep them;
    multi-producer groups (residual adds) use ``residual``: ``pad`` (each producer keeps its own kernels,
    scattered into the union before the add) or ``union`` (every producer keeps the union: more MACs, no
    scatter). Producers without a gate keep all. ``round_to`` grows every kept set (pad: each producer's;
    otherwise the group's) to a multiple of it with the highest-``scores`` kernels (per point; e.g. usage
    frequencies): channel counts that vectorised conv kernels prefer."""
    if residual not in RESIDUAL_LAYOUTS:
        raise PassError(f"unknown residual layout '{residual}'", f"use one of: {', '.join(RESIDUAL_LAYOUTS)}")
    if round_to < 1:
        raise PassError(f"round_to must be >= 1, got {round_to}", "pass 1 (exact sets) or e.g. 8")
    by_group: dict[str, dict[str, list[int]]] = {}
    score_of: dict[str, np.ndarray | None] = {}
    for i, (p, k) in enumerate(zip(points.points, kept, strict=True)):
        if not k:
            raise PassError(f"module keeps no kernel of '{p.producer}'", "lower the threshold for that layer")
        by_group.setdefault(p.group, {})[p.producer] = sorted(int(u) for u in k)
        score_of[p.producer] = None if scores is None else np.asarray(scores[i], dtype=np.float64)
    plan = Plan(meta={"strategy": residual, "round_to": round_to, "source": "modularize"})
    groups = {key: g for g in graph_info(gm).unit_groups if (key := group_keys(gm)[g.gid]) in by_group}
    for key, own in by_group.items():
        size, owners = groups[key].size, producers(groups[key])
        full = list(range(size))
        if len(owners) == 1:
            w = next(iter(owners))
            plan.keep[key] = _rounded(own[w], size, round_to, score_of[w])
        elif residual == "union":
            union = sorted(set().union(*(own.get(w, full) for w in owners)))
            known = [score_of[w] for w in owners if score_of.get(w) is not None]
            plan.keep[key] = _rounded(union, size, round_to, np.max(known, axis=0) if known else None)
            plan.strategies[key] = "union"
        else:
            plan.producer_keep[key] = {w: _rounded(own.get(w, full), size, round_to, score_of.get(w)) for w in owners}
            plan.strategies[key] = "pad"
    return plan


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def _scale_output(gm: fx.GraphModule, name: str, dim: int, factor: torch.Tensor, index: int) -> None:
    """Multiply node ``name``'s output by ``factor`` along ``dim``: folded into a conv/linear/BatchNorm module's
    weight and bias (exact: they are linear in them), else a multiply by a constant buffer."""
    node = next(n for n in gm.graph.nodes if n.name == name)
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    if type(mod) in _FOLDABLE and mod.weight is not None and mod.weight.shape[0] == len(factor):
        mod.weight.mul_(factor.view(-1, *[1] * (mod.weight.dim() - 1)))
        if mod.bias is not None:
            mod.bias.mul_(factor)
        return
    buf = f"_zc_calibration_{index}_{name}"
    gm.register_buffer(buf, factor.clone().unsqueeze(0))  # [1, K]: broadcasts over the batch like a mask
    with gm.graph.inserting_after(node):
        const = gm.graph.get_attr(buf)
    with gm.graph.inserting_after(const):
        scaled = gm.graph.call_function(apply_mask, (node, const, dim))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)


def _kept(layout: PruneLayout, name: str, prefer_pre: bool) -> list[int] | None:
    found = (layout.pre_values.get(name) if prefer_pre else None) or layout.values.get(name)
    return None if found is None else found[1]


def extract_module(
    plain: fx.GraphModule,
    modular: ModularNet,
    plan: Plan,
    semantics: str = "gated",
    own: Sequence[Sequence[int]] | None = None,
    scales: Sequence[np.ndarray] | None = None,
) -> fx.GraphModule:
    """The module ``plan`` cuts from ``plain`` (the analysed original graph carrying the modular model's
    weights, :func:`plain_state`): ``static`` without generators,
    ``gated`` with ``modular``'s generators restricted to the kept channels and kernels (the module
    then equals ``modular`` with the module's binary mask applied). ``own``: the module's kernels per gate
    point when the plan keeps more (``union``, ``round_to``): the extra kernels' masks are multiplied by 0.
    ``calibrated``: static, with every kept kernel multiplied by ``scales[i][k]`` (its mean mask over the
    module's classes' training samples), folded into the chain end's weights where that is exact."""
    if semantics not in SEMANTICS:
        raise PassError(f"unknown module semantics '{semantics}'", f"use one of: {', '.join(SEMANTICS)}")
    validate_plan(plain, plan)
    module, layout, _, _ = build_pruned(plain, plan)
    if semantics == "static":
        return module
    if semantics == "calibrated":
        if scales is None:
            raise PassError("a calibrated module needs the kernels' mean masks", "pass scales= (ModuleMasks.scale)")
        for i, p in enumerate(modular.points.points):
            kept_out = _kept(layout, p.end, True)
            factor = np.asarray(scales[i], dtype=np.float32)[kept_out if kept_out is not None else slice(None)]
            for end in (p.end, *p.regate):
                _scale_output(module, end, p.dim, torch.from_numpy(np.ascontiguousarray(factor)), i)
        module.graph.lint()
        module.recompile()
        return module
    gens = []
    for i, (p, gen) in enumerate(zip(modular.points.points, modular.generators(), strict=True)):
        kept_out = _kept(layout, p.end, True)
        gens.append(gen.restricted(_kept(layout, p.source, False), kept_out))
        if own is not None:
            mine = set(own[i])
            rows = kept_out if kept_out is not None else range(p.units)
            with torch.no_grad():
                gens[-1].module_mask.mul_(torch.tensor([float(u in mine) for u in rows]))
    _insert_gates(module, modular.points.points, gens)
    module.graph.lint()
    module.recompile()
    return module
