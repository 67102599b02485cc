"""Physical prune: a new, smaller GraphModule that keeps the units a :class:`~.plans.Plan` names.

``prune(gm, plan)`` deep-copies ``gm``, slices every parameter and buffer member of the plan's unit
groups, updates module attributes (channels, features, conv groups, norm sizes), inserts the pad
scatters (``pad`` strategy), rewrites size-encoding node arguments and checks every value's shape
on the example input (:mod:`.prune_args`). ``masked_reference(gm, plan)`` is the semantics it must
equal: a copy of ``gm`` with the removed units zeroed and, for groups analysed with
``layernorm_streams="prune"``, every norm or reduction over them computing its statistics over the
kept units only (:mod:`.masked_stats`; docs/prune.md). The input is never modified.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from zoocompiler.core.errors import PassError
from zoocompiler.core.modules import count_params, countable_attention, eval_mode
from zoocompiler.ir import META_KEY, GraphInfo, graph_info

from ..analysis.costs import total_cost
from ..analysis.plans import STRATEGIES, Plan, validate_plan
from ..analysis.unit_groups import layernorm_streams_of
from ..analysis.unit_rules import op_name
from .explicit_mha import ExplicitMultiheadAttention
from .explicit_swin import explicit_shifted_window_attention
from .masked_stats import mask_statistics
from .prune_args import ArgRewriter, Layout
from .prune_layout import PruneLayout, compute_layout, old_shape, set_tensor, tensor_of


@dataclass
class PruneReport:
    """Sizes before/after (MACs at the example input's batch size) and what each group kept."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    per_group: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> kept, size, strategy
    macs_by_strategy: dict[str, int | None] = field(default_factory=dict)  # None: strategy not applicable
    scatters: int = 0  # pad scatter nodes inserted
    layernorm_streams: str = "pin"  # the analysis option; "prune": groups with approx "layernorm" may be cut

    @property
    def param_ratio(self) -> float:
        return self.params_after / max(1, self.params_before)

    @property
    def mac_ratio(self) -> float:
        return self.macs_after / max(1, self.macs_before)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["param_ratio"], d["mac_ratio"] = self.param_ratio, self.mac_ratio
        return d


@dataclass
class PruneResult:
    module: fx.GraphModule
    report: PruneReport


def _example(gm: fx.GraphModule) -> torch.Tensor:
    x = graph_info(gm).example_input
    if x is None or not graph_info(gm).unit_groups:
        raise PassError("graph has no example input or unit groups", "trace it with zoocompiler.trace(model, x)")
    return x


# ----------------------------------------------------------------------------- masked reference


def masked_reference(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """A copy of ``gm`` with every removed unit zeroed in all its parameter members (producers and
    consumers; BatchNorm running statistics are left alone) and, for ``pad``, each producer's
    unkept union units zeroed in that producer's layer and norms. Every LayerNorm, RMSNorm or
    mean/var/std/sum reduction over a pruned unit dim (groups with ``approx == "layernorm"``) computes
    its statistics over the kept units (:func:`.masked_stats.mask_statistics`). See docs/prune.md."""
    validate_plan(gm, plan)
    layout = compute_layout(gm, plan)
    ref = copy.deepcopy(gm)
    with torch.no_grad():
        for name, dims in layout.zero.items():
            t = tensor_of(ref, name)
            if not t.is_floating_point():
                continue
            for dim, positions in dims.items():
                t.index_fill_(dim, torch.tensor(positions, dtype=torch.long), 0.0)
    mask_statistics(ref, layout)
    return ref


# ----------------------------------------------------------------------------- physical rewrite


def _slice_state(new: fx.GraphModule, layout: PruneLayout) -> set[str]:
    """Slice parameters/buffers in place on the copy; return the owning module paths."""
    owners: set[str] = set()
    for name, dims in layout.params.items():
        t = tensor_of(new, name).detach()
        for dim, kept in sorted(dims.items()):
            t = t.index_select(dim, torch.tensor(kept, dtype=torch.long))
        owners.add(set_tensor(new, name, t.contiguous()))
    return owners


def _fix_module(path: str, old: nn.Module, mod: nn.Module) -> None:
    """Update the size attributes of a module whose parameters were sliced."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        out = mod.weight.shape[0]
        groups = old.groups
        if old.groups > 1 and old.weight.shape[1] == 1:  # depthwise (with channel multiplier)
            groups = out // (old.out_channels // old.groups)
        if groups < 1 or out % groups:
            raise PassError(f"conv '{path}': {out} output channels do not split into {groups} groups",
                            "keep whole conv groups (the plan violates the group's structure)")
        mod.groups, mod.out_channels, mod.in_channels = groups, out, mod.weight.shape[1] * groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.GroupNorm):
        c = mod.weight.shape[0]
        if (old.num_groups * c) % old.num_channels:
            raise PassError(f"GroupNorm '{path}': {c} channels are not whole norm groups", "keep whole norm groups")
        mod.num_groups, mod.num_channels = old.num_groups * c // old.num_channels, c
    elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
        mod.normalized_shape = tuple(mod.weight.shape)
    elif isinstance(mod, nn.Embedding):
        mod.embedding_dim = mod.weight.shape[1]
    elif isinstance(mod, nn.RNNBase):
        _fix_recurrent(mod)
    elif path != "" and any(True for _ in mod.parameters(recurse=False)):
        raise PassError(f"module '{path}' ({type(mod).__name__}) has pruned parameters but unknown size attributes",
                        "keep the unit groups of this module unpruned")


def _fix_recurrent(mod: nn.RNNBase) -> None:
    """Sizes of a sliced LSTM/GRU/RNN from its layer-0 weights; re-point its flat weight list."""
    mod.input_size = mod.weight_ih_l0.shape[1]
    if mod.proj_size > 0:
        mod.proj_size, mod.hidden_size = mod.weight_hr_l0.shape
    else:
        mod.hidden_size = mod.weight_hh_l0.shape[1]
    mod._init_flat_weights()  # _flat_weights still holds the unsliced tensors


def _explicit_swin_attention(new: fx.GraphModule, layout: PruneLayout) -> None:
    """Calls of torchvision's ``shifted_window_attention`` whose weights were sliced call
    :func:`.explicit_swin.explicit_shifted_window_attention` with the original head width."""
    for n in new.graph.nodes:
        if n.op != "call_function" or op_name(n) != "torchvision.models.swin_transformer.shifted_window_attention":
            continue
        qkv_w = n.args[1] if len(n.args) > 1 else n.kwargs["qkv_weight"]
        proj_w = n.args[2] if len(n.args) > 2 else n.kwargs["proj_weight"]
        heads = n.args[5] if len(n.args) > 5 else n.kwargs["num_heads"]
        if not any(getattr(w, "op", None) == "get_attr" and w.target in layout.params for w in (qkv_w, proj_w)):
            continue
        head_dim = old_shape(qkv_w)[0] // (3 * int(heads)) if old_shape(qkv_w) else None
        if head_dim is None:
            raise PassError(f"Swin attention at node {n.name}: the qkv weight's shape is unknown",
                            "trace the model with zoocompiler.trace(model, x)")
        n.target = explicit_shifted_window_attention
        n.kwargs = {**n.kwargs, "head_dim": head_dim}


def _insert_scatters(new: fx.GraphModule, layout: PruneLayout, layouts: dict[str, Layout],
                     expected: dict[str, tuple[int, ...]]) -> int:
    """Pad: after each producer chain, scatter its units into the union space (F.pad + index_select)."""
    nodes = {n.name: n for n in new.graph.nodes}
    for i, sc in enumerate(layout.scatters):
        end = nodes[sc.after]
        pre_shape = expected.get(end.name) or old_shape(end)
        rank = len(pre_shape)
        buf = f"_zc_pad_index_{i}"
        new.register_buffer(buf, torch.tensor(sc.index, dtype=torch.long))
        pad = (0, 0) * (rank - 1 - sc.dim) + (0, 1)
        with new.graph.inserting_after(end):
            padded = new.graph.call_function(F.pad, (end, pad))
        with new.graph.inserting_after(padded):
            index = new.graph.get_attr(buf)
        with new.graph.inserting_after(index):
            scattered = new.graph.call_function(torch.index_select, (padded, sc.dim, index))
        end.replace_all_uses_with(scattered, delete_user_cb=lambda u, keep=padded: u is not keep)
        post = list(pre_shape)
        post[sc.dim] = len(sc.index)
        expected[scattered.name] = tuple(post)
        grown = list(pre_shape)
        grown[sc.dim] += 1
        expected[padded.name] = tuple(grown)
        post_layout = layout.values.get(sc.after)
        if post_layout is not None:
            dim, kept = post_layout
            layouts[scattered.name] = (dim, kept, old_shape(end)[dim])
    return len(layout.scatters)


def _from_sliced_params(gm: fx.GraphModule, layout: PruneLayout) -> set[str]:
    """Nodes computed from parameters alone (tensor inputs all parameter-derived), at least one sliced:
    ``cls_token.expand(B, -1, -1)``, ``gamma.reshape(1, -1, 1, 1)``. Their shapes follow the slicing."""
    derived: dict[str, bool] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            derived[n.name] = n.target in layout.params
        elif n.op in ("call_function", "call_method", "call_module"):
            tensors = [a for a in n.all_input_nodes if old_shape(a) is not None or a.op == "get_attr"]
            if tensors and all(a.name in derived for a in tensors):
                derived[n.name] = any(derived[a.name] for a in tensors)
    return {name for name, sliced in derived.items() if sliced}


def _expected(gm: fx.GraphModule, layout: PruneLayout) -> tuple[dict[str, tuple[int, ...]], dict[str, Layout]]:
    expected: dict[str, tuple[int, ...]] = {}
    layouts: dict[str, Layout] = {}
    authoritative = _from_sliced_params(gm, layout)  # parameter slicing decides their shapes
    for n in gm.graph.nodes:
        shape = old_shape(n)
        if shape is None or n.op == "get_attr":  # parameter reads: their slicing is authoritative
            continue
        lay = layout.pre_values.get(n.name) or layout.values.get(n.name)
        if lay is not None:
            dim, kept = lay
            layouts[n.name] = (dim, kept, shape[dim])
            shape = shape[:dim] + (len(kept),) + shape[dim + 1 :]
        elif n.name in authoritative:
            continue
        expected[n.name] = shape
    return expected, layouts


def build_pruned(gm: fx.GraphModule, plan: Plan) -> tuple[fx.GraphModule, PruneLayout, int, int]:
    """The pruned module (validated plan assumed), its layout, the number of pad scatters and its MACs
    on the example input."""
    x = _example(gm)
    layout = compute_layout(gm, plan)
    new = copy.deepcopy(gm)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path in sorted(_slice_state(new, layout) & called):  # others are only read via get_attr
        old = gm.get_submodule(path) if path else gm
        if isinstance(old, nn.MultiheadAttention):  # sliced heads / input width: the explicit-width module
            new.set_submodule(path, ExplicitMultiheadAttention.from_sliced(new.get_submodule(path), old.head_dim))
            continue
        _fix_module(path, old, new.get_submodule(path) if path else new)
    _explicit_swin_attention(new, layout)
    expected, layouts = _expected(gm, layout)
    scatters = _insert_scatters(new, layout, layouts, expected)
    orig = {n.name: n for n in gm.graph.nodes}
    with eval_mode(new), torch.no_grad(), countable_attention(), FlopCounterMode(display=False) as counter:
        sliced = {name: {d: (tensor_of(gm, name).shape[d], len(kept)) for d, kept in dims.items()}
                  for name, dims in layout.params.items()}
        ArgRewriter(new, expected, layouts, orig, gm, sliced).propagate(x)
    new.graph.lint()
    new.recompile()
    for n in new.graph.nodes:
        n.meta.pop(META_KEY, None)
    new.meta[META_KEY] = GraphInfo(example_input=x.clone(), tracer=graph_info(gm).tracer,
                                   extra={"pruned_from": graph_info(gm).extra.get("spec")})
    return new, layout, scatters, int(counter.get_total_flops()) // 2


def prune(gm: fx.GraphModule, plan: Plan, *, strategy_macs: bool = True) -> PruneResult:
    """Physically prune ``gm`` by ``plan``: a new, smaller GraphModule plus a :class:`PruneReport`.

    Raises ``PassError`` (nothing modified) if the plan does not fit the graph or an op's size
    arguments cannot be rewritten. ``strategy_macs=False`` skips the MACs of the other strategies.
    """
    validate_plan(gm, plan)
    new, layout, scatters, macs_after = build_pruned(gm, plan)
    by_strategy: dict[str, int | None] = {s: macs_after for s in STRATEGIES}
    if plan.producer_keep and strategy_macs:
        for s in STRATEGIES:
            try:
                other = plan.with_strategy(s)
                validate_plan(gm, other)
                by_strategy[s] = build_pruned(gm, other)[3]
            except PassError:
                by_strategy[s] = None
    report = PruneReport(
        params_before=count_params(gm),
        params_after=count_params(new),
        macs_before=total_cost(gm).macs,
        macs_after=macs_after,
        per_group=layout.groups,
        macs_by_strategy=by_strategy,
        scatters=scatters,
        layernorm_streams=layernorm_streams_of(gm),
    )
    return PruneResult(new, report)
