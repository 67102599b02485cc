"""Model slicing (paper 003): one global slice rate r keeps a prefix of every prunable unit group.

``make_sliceable(gm)`` copies an analysed GraphModule, optionally sorts each group's units by
importance (an exact permutation), converts BatchNorm to GroupNorm with ``groups`` groups (a unit of
a GroupNorm-coupled group is then a whole norm group, so the valid rates are the multiples of 1/G)
and re-analyses it. The returned :class:`SliceableModel` runs the network at its current
``rate``: every unit ``u >= round(r·size)`` of a prunable group is zeroed in all its parameter
members (the prune pass's masked reference for the prefix plan) and, with ``rescale="dense"``, the
kept input columns of every linear layer are scaled by M / kept (the paper's §3.5.1; convolutions
are not rescaled). :meth:`SliceableModel.slice` materialises the r-subnet through the prune pass
with the prefix plan and folds the rescale into the weights: it equals the sliceable model at r.
Pinned groups (input, classes, anything an unknown op touches) never slice.

Two executions of the same function: ``execution="masked"`` (the reference above: the full-width
graph with masked weights) and ``execution="views"`` (the r-subnet's graph run on slices of the
shared parameters, :class:`SubnetView`; gradients land in the shared tensors, work scales with r²).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call

from zoocompiler.core.errors import BudgetError, PassError
from zoocompiler.core.modules import count_params
from zoocompiler.core.rates import DEFAULT_GROUPS
from zoocompiler.ir import UnitGroup, graph_info
from zoocompiler.solvers.slice_rates import check_rate, valid_rates

from ..analysis import run_analysis
from ..analysis.plans import IMPORTANCES, Plan, graph_fingerprint, groups_by_key, unit_scores
from ..analysis.unit_groups import layernorm_streams_of
from ..analysis.unit_rules import PRODUCER_ROLES
from .prune import prune
from .prune_layout import compute_layout, set_tensor, tensor_of

RESCALE_MODES = ("dense", "none")
EXECUTIONS = ("masked", "views")


def kept_units(size: int, rate: float) -> int:
    """Units a group of ``size`` keeps at ``rate``: ``max(1, floor(rate·size + 1/2))`` (round half up)."""
    return min(size, max(1, math.floor(rate * size + 0.5)))


# ----------------------------------------------------------------------------- preparation


def sort_units(gm: fx.GraphModule, importance: str = "l1") -> int:
    """Permute the units of every prunable group of ``gm`` (in place) so that unit 0 is the most
    important (l1/l2 norm of its producer parameter slices). The network function is unchanged:
    producers and consumers are permuted alike. Returns the number of groups reordered."""
    if importance not in IMPORTANCES or importance == "random":
        raise PassError(f"unknown unit importance '{importance}'", "use l1 or l2")
    reordered, moves = 0, []
    with torch.no_grad():
        for group in graph_info(gm).unit_groups:
            if group.pinned or group.size < 2:
                continue
            producers = [m for m in group.members if m.param is not None and m.role in PRODUCER_ROLES]
            scores = unit_scores(gm, producers, group.size, importance)
            order = sorted(range(group.size), key=lambda u: (-scores[u], u))
            if order == list(range(group.size)):
                continue
            moves.extend(_unit_moves(gm, group, order))
            reordered += 1
        for t, dim, perm in moves:  # every group is checked before any tensor moves
            t.copy_(t.index_select(dim, perm))
    return reordered


def _unit_moves(
    gm: fx.GraphModule, group: UnitGroup, order: list[int]
) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(tensor, dim, permutation) per parameter member that moves unit ``order[u]`` to position ``u``."""
    moves = []
    for m in group.members:
        if m.param is None:
            continue
        t = tensor_of(gm, m.param)
        perm = torch.arange(t.shape[m.dim])
        for u, src in enumerate(order):
            if len(m.indices[u]) != len(m.indices[src]):
                raise PassError(f"group of '{m.param}': units have different widths and cannot be reordered",
                                "make it sliceable without sorting (sort_by=None)")
            perm[m.indices[u]] = torch.tensor(m.indices[src])
        moves.append((t, m.dim, perm))
    return moves


def _group_norm_like(bn: nn.Module, groups: int, path: str) -> nn.Module:
    channels = bn.num_features
    if channels % groups:
        raise PassError(f"BatchNorm '{path}' has {channels} channels, not a multiple of {groups} groups",
                        "pick a group count that divides every normalised width (--groups)")
    if hasattr(bn, "act") and hasattr(bn, "drop"):  # timm BatchNormAct2d: keep its activation
        from timm.layers import GroupNormAct

        gn: nn.Module = GroupNormAct(channels, groups, eps=bn.eps, affine=bn.affine, apply_act=False)
        gn.act, gn.drop = bn.act, bn.drop
    else:
        gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn.train(bn.training)


def convert_batchnorm(gm: fx.GraphModule, groups: int) -> list[str]:
    """Replace every BatchNorm module ``gm`` calls by a GroupNorm with ``groups`` groups (affine copied,
    running statistics dropped), in place; returns their paths. Functional batch norms are refused."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and "batch_norm" in getattr(n.target, "__name__", str(n.target)):
            raise PassError(f"node '{n.name}' calls batch_norm functionally and cannot become a GroupNorm",
                            "use nn.BatchNorm modules in the model")
    paths = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm)]
    for path in dict.fromkeys(paths):
        owner, _, attr = path.rpartition(".")
        parent = gm.get_submodule(owner) if owner else gm
        setattr(parent, attr, _group_norm_like(gm.get_submodule(path), groups, path))
    return list(dict.fromkeys(paths))


def make_sliceable(
    gm: fx.GraphModule, *, groups: int = DEFAULT_GROUPS, rescale: str = "dense", sort_by: str | None = None
) -> SliceableModel:
    """A :class:`SliceableModel` over a converted copy of the analysed ``gm`` (left untouched).

    ``sort_by`` ("l1"/"l2") first reorders units by importance so that prefixes hold the important
    ones (useful when starting from trained weights; done before the GroupNorm conversion, where it
    is exact). Raises ``PassError`` for a graph without analysis, with LayerNorm-pruned streams,
    BatchNorm widths not divisible by ``groups``, or no prunable group.
    """
    if rescale not in RESCALE_MODES:
        raise PassError(f"unknown rescale mode '{rescale}'", f"use one of: {', '.join(RESCALE_MODES)}")
    if groups < 1:
        raise PassError(f"groups must be >= 1, got {groups}", "pass a positive number of GroupNorm groups")
    info = graph_info(gm)
    if info.example_input is None or not info.unit_groups:
        raise PassError("graph has no example input or unit groups", "trace it with zoocompiler.trace(model, x)")
    if layernorm_streams_of(gm) != "pin":
        raise PassError("slicing needs exact prefixes; this graph was analysed with layernorm_streams='prune'",
                        "trace it with the default layernorm_streams='pin'")
    new = copy.deepcopy(gm)
    new.meta["zc"] = copy.deepcopy(info)
    if sort_by is not None:
        sort_units(new, sort_by)
    convert_batchnorm(new, groups)
    new.recompile()
    run_analysis(new)
    prunable = [g for g in graph_info(new).unit_groups if g.prunable]
    if not prunable:
        reasons = sorted({r for g in graph_info(new).unit_groups for r in g.reasons})[:2]
        raise PassError(f"model has no sliceable unit group (all pinned: {'; '.join(reasons) or 'none found'})",
                        "slice a model with conv/linear layers between input and classifier")
    return SliceableModel(new, groups=groups, rescale=rescale)


# ----------------------------------------------------------------------------- the sliceable model


@dataclass
class SlicedModel:
    """A materialised r-subnet: a physically smaller GraphModule with its per-sample size."""

    module: fx.GraphModule
    rate: float
    params: int
    macs: int  # per sample, on the example input's shape

    def to_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "params": self.params, "macs": self.macs}


@dataclass
class SubnetView:
    """The r-subnet's graph (``module``, from the prune pass; its parameters and buffers are placeholders
    on the meta device) and, per parameter or buffer of it, how to cut it from the shared full-width
    tensor: ``cuts[name]`` is ``[(dim, k or kept indices)]`` (a prefix of length k is a ``narrow`` view)
    and ``scale[name]`` the dense-rescale factor of a linear weight."""

    module: fx.GraphModule
    cuts: dict[str, list[tuple[int, int | torch.Tensor]]]
    scale: dict[str, float]

    def weights(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The subnet's parameters and buffers as differentiable cuts of ``params`` (the full-width tensors)."""
        out = {}
        for name, cuts in self.cuts.items():
            w = params[name]
            for dim, cut in cuts:
                w = w.narrow(dim, 0, cut) if isinstance(cut, int) else w.index_select(dim, cut.to(w.device))
            out[name] = w * self.scale[name] if name in self.scale else w
        return out


class SliceableModel(nn.Module):
    """An analysed GraphModule (``gm``) run at one global slice rate (``rate``, default 1.0).

    ``execution="masked"`` (the default and the reference): forward multiplies each sliced parameter
    by its 0/1 prefix mask (and linear inputs by the rescale factor) and calls ``gm`` with those
    weights (``torch.func.functional_call``), so gradients reach only the r-subnet's weights.
    ``execution="views"``: forward runs the r-subnet's own graph on slices of ``gm``'s parameters
    (:meth:`subnet_view`), the same function and gradients at about r² of the work; models whose
    subnet is not a plain cut of the shared weights fall back to masked. ``gm.state_dict()`` holds the
    weights (this module's own ``state_dict()`` has the same keys prefixed by ``gm.``).
    """

    def __init__(self, gm: fx.GraphModule, *, groups: int = DEFAULT_GROUPS, rescale: str = "dense",
                 execution: str = "masked"):
        super().__init__()
        self.gm = gm
        self.groups = groups
        self.rescale = rescale
        self.rate = 1.0
        self.execution = execution
        self._factors: dict[int, dict[str, list[tuple[int, torch.Tensor]]]] = {}
        self._macs: dict[int, int] = {}
        self._views: dict[int, SubnetView | None] = {}

    @property
    def execution(self) -> str:
        """"masked" (full-width graph, masked weights) or "views" (the subnet's graph on weight slices)."""
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise PassError(f"unknown slicing execution '{value}'", f"use one of: {', '.join(EXECUTIONS)}")
        self._execution = value

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_views"] = {}  # rebuilt on demand: the subnet graphs need not travel (Ray, deep copies)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({"_execution": "masked", "_views": {}, **state})  # objects pickled before views

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> SliceableModel:
        self._views = {}  # .to(), .half(), ...: the subnet graphs' constants are rebuilt where the weights are
        return super()._apply(fn, *args, **kwargs)

    def _shared_tensors(self) -> dict[str, torch.Tensor]:
        return {**dict(self.gm.named_buffers()), **dict(self.gm.named_parameters())}

    # rates -------------------------------------------------------------------------------------
    def valid_rates(self, lb: float | None = None) -> list[float]:
        """The rates this model slices at (multiples of 1/groups), at least ``lb`` when given."""
        return valid_rates(self.groups, lb)

    def set_rate(self, rate: float) -> float:
        """Snap ``rate`` to the nearest valid rate, make it current and return it."""
        self.rate = check_rate(rate, self.groups)
        return self.rate

    def _step(self, rate: float) -> int:
        return round(check_rate(rate, self.groups) * self.groups)

    # masks -------------------------------------------------------------------------------------
    def prefix_plan(self, rate: float) -> Plan:
        """The prune plan of the r-subnet: every prunable group keeps its first ``kept_units`` units."""
        r = check_rate(rate, self.groups)
        keep = {key: list(range(kept_units(g.size, r)))
                for key, g in groups_by_key(self.gm).items() if g.prunable and kept_units(g.size, r) < g.size}
        return Plan(keep=keep, meta={"slice_rate": r, "fingerprint": graph_fingerprint(self.gm)})

    def _rescale(self, zero: dict[str, dict[int, list[int]]]) -> dict[str, tuple[int, float]]:
        """Linear weight → (its input dim, M / kept inputs), for linear layers whose inputs are sliced."""
        if self.rescale == "none":
            return {}
        out: dict[str, tuple[int, float]] = {}
        for g in graph_info(self.gm).unit_groups:
            for m in g.members:
                if m.role == "linear_in" and m.param is not None and m.param not in out:
                    width = tensor_of(self.gm, m.param).shape[m.dim]
                    removed = len(zero.get(m.param, {}).get(m.dim, ()))
                    if removed:
                        out[m.param] = (m.dim, width / (width - removed))
        return out

    def factors(self, rate: float) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """Parameter name → [(dim, vector)]: multiplying the parameter by each vector (broadcast along
        ``dim``) gives its weights at ``rate``. Cached per rate."""
        j = self._step(rate)
        if j not in self._factors:
            plan = self.prefix_plan(j / self.groups)
            zero = compute_layout(self.gm, plan).zero if plan.keep else {}
            params = dict(self.gm.named_parameters())
            scale = self._rescale(zero)
            out: dict[str, list[tuple[int, torch.Tensor]]] = {}
            for name, dims in zero.items():
                if name not in params:
                    continue
                for dim, positions in dims.items():
                    vec = torch.ones(params[name].shape[dim])
                    vec[positions] = 0.0
                    if name in scale and dim == scale[name][0]:  # a linear weight's input dim
                        vec *= scale[name][1]
                    out.setdefault(name, []).append((dim, vec))
            self._factors[j] = out
        return self._factors[j]

    def subnet_masks(self, rate: float) -> dict[str, torch.Tensor]:
        """Parameter name → boolean tensor of its shape: True where the weight belongs to the r-subnet
        (every parameter of ``gm``; parameters no group slices are all True)."""
        factors = self.factors(rate)
        out = {}
        for name, p in self.gm.named_parameters():
            inside = torch.ones_like(p, dtype=torch.bool)
            for dim, vec in factors.get(name, []):
                shape = [1] * p.dim()
                shape[dim] = -1
                inside = inside & (vec != 0).to(p.device).view(shape)
            out[name] = inside
        return out

    def weights_at(self, rate: float) -> dict[str, torch.Tensor]:
        """The parameters that differ at ``rate`` (masked and rescaled), differentiable w.r.t. ``gm``'s."""
        params = dict(self.gm.named_parameters())
        out = {}
        for name, fs in self.factors(rate).items():
            w = params[name]
            for dim, vec in fs:
                shape = [1] * w.dim()
                shape[dim] = -1
                w = w * vec.to(w.device, w.dtype).view(shape)
            out[name] = w
        return out

    def subnet_view(self, rate: float) -> SubnetView | None:
        """The r-subnet's graph with the cuts of the shared weights that give its parameters (cached per rate);
        None when some subnet parameter is not a plain cut of a shared one (the prune pass changed values)."""
        j = self._step(rate)
        if j not in self._views:
            self._views[j] = self._build_view(j / self.groups)
        return self._views[j]

    def _build_view(self, rate: float) -> SubnetView | None:
        plan = self.prefix_plan(rate)
        pruned = prune(self.gm, plan, strategy_macs=False)
        sub = pruned.module
        self._macs[self._step(rate)] = pruned.report.macs_after // graph_info(self.gm).example_input.shape[0]
        layout = compute_layout(self.gm, plan) if plan.keep else None
        shared = self._shared_tensors()
        own = {**dict(sub.named_buffers()), **dict(sub.named_parameters())}
        cuts: dict[str, list[tuple[int, int | torch.Tensor]]] = {}
        for name in own:
            if name not in shared:
                return None
            kept_by_dim = layout.params.get(name, {}) if layout is not None else {}
            cuts[name] = [(dim, len(kept) if kept == list(range(len(kept))) else torch.tensor(kept, dtype=torch.long))
                          for dim, kept in sorted(kept_by_dim.items())]
        with torch.no_grad():
            cut = SubnetView(sub, cuts, {}).weights(shared)
            if any(cut[n].shape != t.shape or not torch.equal(cut[n], t) for n, t in own.items()):
                return None
        for name, t in own.items():  # the view's own tensors are never used: placeholders only
            set_tensor(sub, name, torch.empty_like(t, device="meta"))
        return SubnetView(sub, cuts, {name: s for name, (_, s) in self._rescale(layout.zero if layout else {}).items()})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The network at ``rate``; with a tuple of rates, the tuple of its outputs at each (one forward call
        for several widths, as the sandwich rule trains them: one backward, one DDP reduction)."""
        if isinstance(self.rate, tuple):
            return tuple(self._at(r, args, kwargs) for r in self.rate)
        return self._at(self.rate, args, kwargs)

    def _at(self, rate: float, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.factors(rate):  # rate 1: the full network
            return self.gm(*args, **kwargs)
        view = self.subnet_view(rate) if self.execution == "views" else None
        if view is not None:
            view.module.train(self.training)
            return functional_call(view.module, view.weights(self._shared_tensors()), args, kwargs, strict=False)
        return functional_call(self.gm, self.weights_at(rate), args, kwargs, strict=False)

    # materialise -------------------------------------------------------------------------------
    def slice(self, rate: float) -> SlicedModel:
        """The r-subnet as a physically smaller GraphModule (prune pass, prefix plan, rescale folded
        in); equal to this model run at ``rate``. The module is in eval mode. Where the subnet is a plain
        cut of the shared weights (:meth:`subnet_view`), it is a copy of the view's graph holding the cuts."""
        r = check_rate(rate, self.groups)
        view = self.subnet_view(r)
        if view is not None:
            sub = copy.deepcopy(view.module)
            sub.meta = copy.deepcopy(view.module.meta)
            with torch.no_grad():
                for name, t in view.weights(self._shared_tensors()).items():
                    set_tensor(sub, name, t.detach().clone())
            return SlicedModel(sub.eval(), r, count_params(sub), self._macs[self._step(r)])
        plan = self.prefix_plan(r)
        module = prune(self.gm, plan, strategy_macs=False)
        sub, report = module.module, module.report
        zero = compute_layout(self.gm, plan).zero if plan.keep else {}
        with torch.no_grad():
            for name, (_, s) in self._rescale(zero).items():
                sub.get_parameter(name).mul_(s)
        batch = graph_info(self.gm).example_input.shape[0]
        self._macs[round(r * self.groups)] = report.macs_after // batch
        return SlicedModel(sub.eval(), r, count_params(sub), report.macs_after // batch)

    def macs_at(self, rate: float) -> int:
        """Per-sample MACs of the r-subnet (measured on the materialised module; cached)."""
        j = self._step(rate)
        if j not in self._macs:
            self.slice(j / self.groups)
        return self._macs[j]


# ----------------------------------------------------------------------------- budgets


def rate_for_budget(model: SliceableModel, *, flops: float, lb: float | None = None) -> float:
    """The largest valid rate (≥ ``lb``) whose *measured* per-sample MACs are at most ``flops``.

    The r² rule (``r ≈ sqrt(Ct / C0)``) is only the first guess; the search then walks the valid
    rates up or down on measured MACs. Raises ``BudgetError`` naming the smallest reachable MACs.
    """
    if flops <= 0:
        raise BudgetError(f"flops budget must be positive, got {flops:g}", "pass e.g. --flops 10M")
    rates = model.valid_rates(lb)
    full = model.macs_at(1.0)
    guess = min(1.0, math.sqrt(flops / full))
    i = min(range(len(rates)), key=lambda k: abs(rates[k] - guess))
    if model.macs_at(rates[i]) <= flops:
        while i + 1 < len(rates) and model.macs_at(rates[i + 1]) <= flops:
            i += 1
        return rates[i]
    while i > 0:
        i -= 1
        if model.macs_at(rates[i]) <= flops:
            return rates[i]
    smallest = model.macs_at(rates[0])
    raise BudgetError(f"flops budget {flops:,.0f} is below the smallest slice (rate {rates[0]:g}: {smallest:,} MACs)",
                      f"raise the budget to at least {smallest:,} or train with a lower --lb")
