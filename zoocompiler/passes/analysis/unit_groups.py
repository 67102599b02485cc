"""Unit-group analysis: which channel / feature / head dimensions must be pruned together.

``find_unit_groups(gm)`` walks the graph once with the per-op rules of :mod:`.unit_rules` (looked
up in its registry, which :func:`~.unit_rules.register_module_rule` extends), which move integer
*unit elements* through every value (union-find over elements), then

1. unites duplicate parameter records and makes every multi-dim unit table rectangular
   (a tensor can only lose whole slices, so units may vary along one of its unit dims only),
2. groups the resulting classes: classes that occur in exactly the same places (values and
   parameter slices) form one :class:`~zoocompiler.ir.UnitGroup`, one unit per class,
3. records members (``indices[u]`` = positions of unit ``u`` along the member's dim), pins
   with reasons, and the kind ("channel", "feature", "head").

``UnitGroupPass`` stores the groups in ``graph_info(gm).unit_groups`` and, per tensor node,
``node_info(n).unit_dim`` / ``unit_groups`` (group id per index of that dim).

Option ``layernorm_streams``: ``"pin"`` (default) pins the units a LayerNorm, RMSNorm or
mean/var/std/sum reduction normalises over; ``"prune"`` leaves them prunable and marks their
groups ``approx == "layernorm"`` (pruned == the masked reference with statistics over the kept
units, see docs/prune.md); ``"auto"`` is ``"prune"`` except for streams that also pass depthwise
convolutions (ConvNeXt-style), which it pins: where pruning the statistics was measured to pay
(docs/bench_layernorm_default.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from zoocompiler.core.errors import InputShapeError, PassError
from zoocompiler.core.text import first_line
from zoocompiler.ir import Layout, UnitGroup, UnitMember, graph_info, node_info

from .unit_rules import (
    APPROX_LAYERNORM,
    LAYERNORM_STREAMS,
    Cx,
    ParamRef,
    Place,
    RuleFailure,
    ShapeDeps,
    Store,
    Table,
    TensorSpec,
    apply_rule,
    op_name,
    unknown,
)
from .values import SharedValues, record_values

MAX_REASONS = 12
APPROX_TEXT = {APPROX_LAYERNORM: "LayerNorm statistics over the kept units"}


def check_layernorm_streams(mode: str) -> str:
    """``mode`` if it is a known ``layernorm_streams`` option, else ``PassError``."""
    if mode not in LAYERNORM_STREAMS:
        raise PassError(f"unknown layernorm_streams '{mode}'", f"use one of: {', '.join(LAYERNORM_STREAMS)}")
    return mode


def group_approx(group: UnitGroup) -> str | None:
    """The relaxed semantics a prunable group is pruned under (``"layernorm"``), or None when exact."""
    return group.approx


def layernorm_streams_of(gm: fx.GraphModule) -> str:
    """The ``layernorm_streams`` option ``gm``'s unit groups were computed with ("pin" if never set)."""
    return graph_info(gm).extra.get("layernorm_streams", "pin")

# ----------------------------------------------------------------------------- concrete values


def _example_input(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    x = graph_info(gm).example_input
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if x is not None and len(placeholders) == 1:
        return (x,)
    inputs = []
    for n in placeholders:
        tm = n.meta.get("tensor_meta", n.meta.get("val"))
        if not hasattr(tm, "shape"):
            raise PassError(
                f"graph input '{n.name}' has no example value",
                "trace the model with zoocompiler.trace(model, example_input)",
            )
        inputs.append(torch.zeros(tuple(tm.shape), dtype=tm.dtype))
    return tuple(inputs)


def concrete_metas(gm: fx.GraphModule, shared: SharedValues | None = None) -> dict[fx.Node, Any]:
    """Shapes/dtypes of tensors and values of the rest, from one run of the graph on its example input
    (``shared``'s run when given). ``PassError`` when the graph does not run on it."""
    inputs = _example_input(gm)
    try:
        if shared is not None and len(inputs) == 1 and inputs[0] is graph_info(gm).example_input:
            return shared.get(gm).specs
        return record_values(gm, *inputs).specs
    except InputShapeError as err:
        cause = err.__cause__ or err
        raise PassError(
            f"graph does not run on its example input ({first_line(cause)})",
            "re-trace the model with an input shape it accepts",
        ) from cause


# ----------------------------------------------------------------------------- propagation


def _input_units(store: Store, node: fx.Node, spec: Any) -> Any:
    if not isinstance(spec, TensorSpec) or not spec.dtype.is_floating_point or len(spec.shape) < 2:
        return None
    tensor = node_info(node).tensor
    dim = tensor.channel_dim if tensor is not None and tensor.channel_dim is not None else 1
    ids = store.fresh(spec.shape[dim])
    store.pin(ids, "model input")
    return Table((dim,), ids)


def _param_ref(gm: fx.GraphModule, node: fx.Node, spec: Any) -> Any:
    if not isinstance(spec, TensorSpec):
        return None
    return ParamRef(((str(node.target), tuple(range(len(spec.shape)))),))


def _valid(state: Any, spec: Any) -> bool:
    if isinstance(state, list):
        specs = spec if isinstance(spec, (list, tuple)) else [None] * len(state)
        return len(specs) == len(state) and all(_valid(s, p) for s, p in zip(state, specs))
    if not isinstance(state, Table):
        return True
    if not isinstance(spec, TensorSpec):
        return False
    dims = state.dims
    if list(dims) != sorted(set(dims)) or not all(0 <= d < len(spec.shape) for d in dims):
        return False
    return tuple(state.ids.shape) == tuple(spec.shape[d] for d in dims)


def propagate(
    gm: fx.GraphModule, metas: dict[fx.Node, Any], layernorm_streams: str = "pin"
) -> tuple[Store, dict[fx.Node, Any]]:
    """Walk the graph once, applying each node's rule; return the store and every node's state."""
    store = Store()
    states: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        spec = metas.get(node)
        if node.op == "placeholder":
            states[node] = _input_units(store, node, spec)
        elif node.op == "get_attr":
            states[node] = _param_ref(gm, node, spec)
        elif node.op == "output":
            _pin_outputs(store, node, states)
            continue
        else:
            cx = Cx(store, gm, node, states, metas, op_name(node), layernorm_streams)
            mark = (len(store.pairs), len(store.pins), len(store.heads), len(store.places), len(store.approx))
            try:
                state = apply_rule(cx)
                if not _valid(state, spec):
                    raise RuleFailure(f"rule result does not match the value's shape at node {node.name}")
            except Exception as err:  # noqa: BLE001 - fail closed on any rule gap or bug, with a reason
                _rollback(store, mark)
                why = f"not supported ({err})" if isinstance(err, RuleFailure) else f"{type(err).__name__}: {err}"
                state = unknown(cx, f"{cx.where()} could not be analysed: {why}")
            states[node] = state
        state = states[node]
        if isinstance(state, Table):
            store.places.append(Place(node.name, None, "value", state.dims, state.ids))
    return store, states


def _rollback(store: Store, mark: tuple[int, int, int, int, int]) -> None:
    """Forget what a failed rule recorded; the unknown-op rule then pins the node's inputs."""
    del store.pairs[mark[0] :], store.pins[mark[1] :], store.heads[mark[2] :], store.places[mark[3] :]
    del store.approx[mark[4] :]


def _pin_outputs(store: Store, node: fx.Node, states: dict[fx.Node, Any]) -> None:
    outs: list[fx.Node] = []
    fx.node.map_arg(node.args, outs.append)
    for n in outs:
        s = states.get(n)
        for item in s if isinstance(s, list) else [s]:
            if isinstance(item, Table):
                store.pin(item.ids, "model output")
            elif isinstance(item, ShapeDeps):
                for ids in item.ids:
                    store.pin(ids, "model output")


# ----------------------------------------------------------------------------- classes


def _labels(store: Store) -> np.ndarray:
    n = store.count
    if not store.pairs or n == 0:
        return np.arange(n, dtype=np.int64)
    pairs = np.concatenate(store.pairs)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def _merge_param_duplicates(store: Store) -> list[Place]:
    """One place per (parameter, dims): repeated records of the same slice are the same units."""
    first: dict[tuple[str, tuple[int, ...]], Place] = {}
    places: list[Place] = []
    for pl in store.places:
        if pl.param is None:
            places.append(pl)
            continue
        key = (pl.param, pl.dims)
        if key not in first:
            first[key] = pl
            places.append(pl)
        elif first[key].ids.shape == pl.ids.shape:
            store.union(first[key].ids, pl.ids)
        else:
            store.pin(first[key].ids, f"parameter {pl.param} is used with different unit layouts")
            store.pin(pl.ids, f"parameter {pl.param} is used with different unit layouts")
    return places


def _varying_axes(lab: np.ndarray) -> list[int]:
    return [ax for ax in range(lab.ndim) if lab.shape[ax] > 1 and not np.all(lab == lab.take([0], axis=ax))]


def _make_rectangular(store: Store, places: list[Place]) -> np.ndarray:
    """Unite classes until every multi-dim table varies along one dim only; return final labels."""
    labels = _labels(store)
    multi = [pl for pl in places if pl.ids.ndim > 1]
    while True:
        changed = False
        for pl in multi:
            varying = _varying_axes(labels[pl.ids])
            if len(varying) > 1:
                keep = max(varying, key=lambda ax: (pl.ids.shape[ax], ax))
                store.union_along(pl.ids, (keep,))
                changed = True
        if not changed:
            return labels
        labels = _labels(store)


def _flatten_place(pl: Place, labels: np.ndarray) -> tuple[int, np.ndarray]:
    """(tensor dim, class per index along it) for a place whose classes vary along one dim at most."""
    lab = labels[pl.ids]
    if lab.ndim == 1:
        return pl.dims[0], lab
    varying = _varying_axes(lab)
    if varying:
        axis = varying[0]
    else:
        ones = [ax for ax in range(lab.ndim) if lab.shape[ax] == 1]
        axis = ones[0] if ones else 0
    for ax in reversed(range(lab.ndim)):
        if ax != axis:
            lab = lab.take(0, axis=ax)
    return pl.dims[axis], lab


# ----------------------------------------------------------------------------- groups


def _group_classes(flat: list[np.ndarray], n_labels: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Group classes by the exact set of places they occur in.

    Returns (group of each class or -1, unit index of each class, classes of each group in unit order).
    Groups are ordered by their first place, units by their first position in it.
    """
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 2**63 - 1, size=(len(flat), 2), dtype=np.int64).astype(np.uint64)
    h = np.zeros((n_labels, 2), dtype=np.uint64)
    first_place = np.full(n_labels, len(flat), dtype=np.int64)
    first_pos = np.zeros(n_labels, dtype=np.int64)
    for i, lab in enumerate(flat):
        uniq, pos = np.unique(lab, return_index=True)
        np.add.at(h, uniq, weights[i])
        new = first_place[uniq] > i
        first_place[uniq[new]] = i
        first_pos[uniq[new]] = pos[new]
    present = np.flatnonzero(first_place < len(flat))
    keys: dict[tuple[int, int], list[int]] = {}
    for c in present[np.lexsort((first_pos[present], first_place[present]))]:
        keys.setdefault((int(h[c, 0]), int(h[c, 1])), []).append(int(c))
    groups = [np.array(cs, dtype=np.int64) for cs in keys.values()]
    groups.sort(key=lambda cs: (first_place[cs[0]], first_pos[cs[0]]))
    group_of = np.full(n_labels, -1, dtype=np.int64)
    unit_of = np.full(n_labels, -1, dtype=np.int64)
    for g, cs in enumerate(groups):
        group_of[cs] = g
        unit_of[cs] = np.arange(len(cs))
    return group_of, unit_of, groups


def _members_of_place(
    pl: Place, dim: int, lab: np.ndarray, group_of: np.ndarray, unit_of: np.ndarray, groups: list[UnitGroup]
) -> None:
    g, u = group_of[lab], unit_of[lab]
    pos = np.arange(len(lab))
    order = np.lexsort((pos, u, g))
    g, u, pos = g[order], u[order], pos[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        group = groups[int(g[s])]
        positions = pos[s:e].tolist()
        if e - s == group.size and (u[s:e] == np.arange(group.size)).all():  # each unit once: one position each
            indices = [[p] for p in positions]
        else:
            indices = [[] for _ in range(group.size)]
            for unit, p in zip(u[s:e].tolist(), positions):
                indices[unit].append(p)
        group.members.append(UnitMember(pl.node, dim, indices, pl.role, pl.param))


def _kind(group: UnitGroup, is_head: bool, ranks: dict[str, int], layouts: dict[str, str | None]) -> str:
    if is_head:
        return "head"
    votes = {"channel": 0, "feature": 0}
    for m in group.members:
        if m.param is not None:
            continue
        layout = layouts.get(m.node)
        if layout in (Layout.MAP, Layout.MAP_NHWC):
            votes["channel"] += 1
        elif layout in (Layout.TOKENS, Layout.FLAT):
            votes["feature"] += 1
        else:
            rank = ranks.get(m.node, 0)
            votes["channel" if (rank >= 3 and m.dim == 1) or rank >= 4 else "feature"] += 1
    return "channel" if votes["channel"] >= votes["feature"] else "feature"


def find_unit_groups(
    gm: fx.GraphModule, *, layernorm_streams: str = "pin", shared: SharedValues | None = None
) -> list[UnitGroup]:
    """Analyse ``gm`` and return its unit groups (also annotating ``node_info(n).unit_dim/unit_groups``).

    ``layernorm_streams="prune"`` / ``"auto"``: norms over a unit dim do not pin it (see the module docstring).
    ``shared``: the run of the example input to read concrete values from (else a run of its own).
    """
    check_layernorm_streams(layernorm_streams)
    metas = concrete_metas(gm, shared)
    store, _ = propagate(gm, metas, layernorm_streams)
    places = _merge_param_duplicates(store)
    labels = _make_rectangular(store, places)
    flat_dims = [_flatten_place(pl, labels) for pl in places]
    group_of, unit_of, classes = _group_classes([lab for _, lab in flat_dims], store.count)
    groups = [UnitGroup(gid=g, size=len(cs)) for g, cs in enumerate(classes)]
    for pl, (dim, lab) in zip(places, flat_dims):
        _members_of_place(pl, dim, lab, group_of, unit_of, groups)
    _apply_pins(store, places, flat_dims, labels, group_of, groups)
    for ids, tag in store.approx:
        for g in np.unique(group_of[labels[ids]]):
            if g >= 0 and groups[int(g)].prunable:
                groups[int(g)].approx = tag
    if layernorm_streams == "auto":
        _pin_depthwise_streams(groups)
    head_labels = np.unique(labels[np.concatenate(store.heads)]) if store.heads else np.zeros(0, dtype=np.int64)
    head_groups = {int(g) for g in group_of[head_labels] if g >= 0}
    ranks = {n.name: len(m.shape) for n, m in metas.items() if isinstance(m, TensorSpec)}
    layouts = {n.name: (node_info(n).tensor.layout if node_info(n).tensor is not None else None) for n in metas}
    for g in groups:
        g.kind = _kind(g, g.gid in head_groups, ranks, layouts)
    _annotate_nodes(gm, places, flat_dims, group_of)
    return groups


def _pin_depthwise_streams(groups: list[UnitGroup]) -> None:
    """``layernorm_streams="auto"``: pin the approx groups with a depthwise-conv member (ConvNeXt streams)."""
    for g in groups:
        if g.approx is not None and any(m.role == "conv_dw" for m in g.members):
            g.pinned, g.approx = True, None
            g.reasons.append("normalised stream through depthwise convs: kept whole by layernorm_streams='auto' "
                             "(pass 'prune' to prune it; docs/bench_layernorm_default.md)")


def _apply_pins(
    store: Store,
    places: list[Place],
    flat_dims: list[tuple[int, np.ndarray]],
    labels: np.ndarray,
    group_of: np.ndarray,
    groups: list[UnitGroup],
) -> None:
    first = ("model input", "model output")
    for ids, reason in sorted(store.pins, key=lambda p: p[1] not in first):
        for g in np.unique(group_of[labels[ids]]):
            if g >= 0:
                _pin(groups[int(g)], reason)
    for pl, (_, lab) in zip(places, flat_dims):
        if pl.param is not None and pl.param in store.taints:
            reason = f"parameter {pl.param} is also used where units cannot be traced ({store.taints[pl.param]})"
            for g in np.unique(group_of[lab]):
                _pin(groups[int(g)], reason)


def _pin(group: UnitGroup, reason: str) -> None:
    if len(group.reasons) < MAX_REASONS or reason in group.reasons:
        group.pin(reason)
    else:
        group.pinned = True


def _annotate_nodes(
    gm: fx.GraphModule, places: list[Place], flat_dims: list[tuple[int, np.ndarray]], group_of: np.ndarray
) -> None:
    by_node = {pl.node: (dim, lab) for pl, (dim, lab) in zip(places, flat_dims) if pl.param is None}
    for n in gm.graph.nodes:
        info = node_info(n)
        if n.name in by_node:
            dim, lab = by_node[n.name]
            info.unit_dim = int(dim)
            info.unit_groups = group_of[lab].tolist()
        else:
            info.unit_dim = None
            info.unit_groups = None


def describe_group(group: UnitGroup, max_params: int = 4) -> str:
    """One line for reports and the CLI: id, kind, units, status, and the parameter slices per unit."""
    status = "prunable" if group.prunable else f"pinned: {group.reasons[0] if group.reasons else 'no reason'}"
    approx = group_approx(group)
    if approx is not None and group.prunable:
        status += f"; {APPROX_TEXT.get(approx, approx)}"
    params = [m for m in group.members if m.param is not None]
    shown = ", ".join(f"{m.param}[dim {m.dim}] {len(m.indices[0])}/unit ({m.role})" for m in params[:max_params])
    more = f", +{len(params) - max_params} more" if len(params) > max_params else ""
    return f"g{group.gid} {group.kind} x{group.size} ({status}): {shown}{more}"


class UnitGroupPass(PassBase):
    """Annotate unit groups: ``graph_info(gm).unit_groups`` and per-node unit dims (idempotent).

    The option is recorded in ``graph_info(gm).extra["layernorm_streams"]`` (plans and prune read it).
    """

    def __init__(self, layernorm_streams: str = "pin", shared: SharedValues | None = None):
        super().__init__()
        self.layernorm_streams = check_layernorm_streams(layernorm_streams)
        self.shared = shared

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        info = graph_info(graph_module)
        info.unit_groups = find_unit_groups(graph_module, layernorm_streams=self.layernorm_streams, shared=self.shared)
        info.extra["layernorm_streams"] = self.layernorm_streams
        return PassResult(graph_module, False)
