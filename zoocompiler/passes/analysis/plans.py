"""Prune plans: which units of every unit group (and, per producer, of multi-producer groups) stay.

A :class:`Plan` is plain data keyed by :func:`group_key` (stable across fresh traces of the same
model), serialised as JSON and checked against a graph by :func:`validate_plan`.
:func:`plan_by_importance` makes one from parameter magnitudes (or seeded random scores).

Per-producer choices: a group fed by several producers (residual adds, SE gates) may list, per
producer weight, the units that producer keeps (``producer_keep``). ``keep`` is always the set the
group's *values* keep: under ``union`` the union of the producers' sets, under ``intersection``
their intersection, under ``pad`` the union while each producer computes only its own units and
is scattered into the union space (see docs/prune.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from zoocompiler.core.atomic import write_json_atomic
from zoocompiler.core.errors import PassError
from zoocompiler.core.schema import ListOf, MapOf, OneOf, load_json, parse_json
from zoocompiler.ir import UnitGroup, UnitMember, graph_info

from .unit_groups import layernorm_streams_of
from .unit_rules import PRODUCER_ROLES

PLAN_FORMAT = "zoocompiler.plan/1"
STRATEGIES = ("union", "intersection", "pad")
IMPORTANCES = ("l1", "l2", "random")
SOURCE_ROLES = ("conv_out", "linear_out", "embedding_out")  # members that create a group's units
PLAN_SCHEMA = {
    "format?": OneOf((PLAN_FORMAT,)),
    "strategy?": str,
    "strategies?": MapOf(str),
    "keep?": MapOf(ListOf(int)),
    "producer_keep?": MapOf(MapOf(ListOf(int))),
    "meta?": dict,
}
PLAN_FIX = "pass a plan.json written by zoocompile prune or Plan.save (format: docs/prune.md)"


# ----------------------------------------------------------------------------- keys


def _first_producer(group: UnitGroup) -> UnitMember | None:
    return next((m for m in group.members if m.param is not None and m.role in PRODUCER_ROLES), None)


def _base_key(group: UnitGroup) -> tuple[str, int]:
    m = _first_producer(group)
    if m is not None:
        return f"{m.param}:{m.role}", m.indices[0][0]
    value = next((m for m in group.members if m.param is None), None)
    if value is not None:
        return f"{value.node}:value", value.indices[0][0]
    return f"g{group.gid}", 0


def group_keys(gm: fx.GraphModule) -> dict[int, str]:
    """Group id → key for every unit group of ``gm`` (``param:role``, ``@pos`` appended on collisions)."""
    groups = graph_info(gm).unit_groups
    bases = [_base_key(g) for g in groups]
    counts: dict[str, int] = {}
    for base, _ in bases:
        counts[base] = counts.get(base, 0) + 1
    return {g.gid: (base if counts[base] == 1 else f"{base}@{pos}") for g, (base, pos) in zip(groups, bases)}


def group_key(gm: fx.GraphModule, group: UnitGroup) -> str:
    """Stable, human-readable key of ``group``: its first producer parameter and role, e.g.
    ``"layer1.0.conv1.weight:conv_out"`` (``"node:value"`` when it has no producer parameter)."""
    return group_keys(gm)[group.gid]


def groups_by_key(gm: fx.GraphModule) -> dict[str, UnitGroup]:
    """Key → group for every unit group of ``gm``."""
    keys = group_keys(gm)
    return {keys[g.gid]: g for g in graph_info(gm).unit_groups}


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the unit-group structure (keys and sizes): equal for fresh traces of the same model."""
    keys = group_keys(gm)
    text = ";".join(f"{keys[g.gid]}={g.size}{'p' if g.pinned else ''}" for g in graph_info(gm).unit_groups)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def producers(group: UnitGroup) -> dict[str, list[UnitMember]]:
    """Producer name (its weight's qualified name) → its parameter members, for the layers that create
    the group's units (conv/linear outputs, embeddings). Two or more entries: a multi-producer group."""
    by_owner: dict[str, list[UnitMember]] = {}
    for m in group.members:
        if m.param is not None and m.role in SOURCE_ROLES:
            by_owner.setdefault(m.param.rpartition(".")[0], []).append(m)
    out: dict[str, list[UnitMember]] = {}
    for members in by_owner.values():
        name = next((m.param for m in members if not m.param.endswith("bias")), members[0].param)
        out[name] = members
    return out


# ----------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """Kept unit indices per group key (sorted, unique), optional per-producer choices and strategies."""

    keep: dict[str, list[int]] = field(default_factory=dict)
    producer_keep: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    strategy: str = "union"
    strategies: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def strategy_for(self, key: str) -> str:
        """The strategy of group ``key`` (its override, else the plan default)."""
        return self.strategies.get(key, self.strategy)

    def with_strategy(self, strategy: str) -> Plan:
        """A copy where every group uses ``strategy`` and groups with per-producer choices keep the
        union (``union``/``pad``) or intersection (``intersection``) of their producers' sets."""
        if strategy not in STRATEGIES:
            raise PassError(f"unknown strategy '{strategy}'", f"use one of: {', '.join(STRATEGIES)}")
        keep = {k: list(v) for k, v in self.keep.items()}
        for key, per in self.producer_keep.items():
            keep[key] = derive_keep(per, strategy)
        return Plan(keep, _copy_pk(self.producer_keep), strategy, {}, dict(self.meta, strategy=strategy))

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PLAN_FORMAT,
                "strategy": self.strategy,
                "strategies": self.strategies,
                "keep": self.keep,
                "producer_keep": self.producer_keep,
                "meta": self.meta,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str | Path = "(text)") -> Plan:
        """Parse a plan read from ``source``; non-UTF-8 or invalid JSON, malformed fields and a plan that
        keeps nothing (no ``keep`` nor ``producer_keep`` entry) raise ``PassError`` (one line)."""
        return cls._from_doc(parse_json(text, source, PLAN_SCHEMA, what="plan", error=PassError, fix=PLAN_FIX), source)

    @classmethod
    def _from_doc(cls, data: dict[str, Any], source: str | Path) -> Plan:
        keep, pk = data.get("keep", {}), data.get("producer_keep", {})
        if not keep and not pk:
            raise PassError(f"plan {source} is empty (no 'keep' or 'producer_keep' entry): it would prune nothing",
                            PLAN_FIX)
        return cls({k: list(v) for k, v in keep.items()}, _copy_pk(pk), data.get("strategy", "union"),
                   dict(data.get("strategies", {})), dict(data.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        return write_json_atomic(path, json.loads(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file (see :meth:`from_json`); a missing or unreadable file is a ``PassError``."""
        return cls._from_doc(load_json(path, PLAN_SCHEMA, what="plan", error=PassError, fix=PLAN_FIX), path)


def _copy_pk(pk: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, list[int]]]:
    return {k: {p: list(v) for p, v in d.items()} for k, d in pk.items()}


def derive_keep(per_producer: dict[str, list[int]], strategy: str) -> list[int]:
    """The group's kept units from its producers' sets: union (``union``, ``pad``) or intersection."""
    sets = [set(v) for v in per_producer.values()]
    if not sets:
        return []
    out = set.intersection(*sets) if strategy == "intersection" else set.union(*sets)
    return sorted(out)


def resolved_keep(group: UnitGroup, key: str, plan: Plan) -> list[int]:
    """What the group's values keep under ``plan`` (all units when the plan does not mention it)."""
    if key in plan.keep:
        return sorted(plan.keep[key])
    if key in plan.producer_keep:
        return derive_keep(plan.producer_keep[key], plan.strategy_for(key))
    return list(range(group.size))


# ----------------------------------------------------------------------------- validation


def _check_indices(key: str, what: str, idx: list[int], size: int) -> None:
    bad = [i for i in idx if not (isinstance(i, int) and 0 <= i < size)]
    if bad:
        raise PassError(f"group '{key}': {what} index {bad[0]} is out of range (group has {size} units)",
                        f"use unit indices 0..{size - 1}")
    if len(set(idx)) != len(idx):
        dup = next(i for i in idx if idx.count(i) > 1)
        raise PassError(f"group '{key}': {what} lists unit {dup} twice", "list each kept unit once")
    if not idx:
        raise PassError(f"group '{key}': {what} keeps no unit (group emptied completely)",
                        "keep at least one unit per group")


def validate_plan(gm: fx.GraphModule, plan: Plan) -> None:
    """Raise ``PassError`` naming the group and the rule if ``plan`` does not fit ``gm``."""
    by_key = groups_by_key(gm)
    mode, graph_mode = plan.meta.get("layernorm_streams"), layernorm_streams_of(gm)
    if mode is not None and mode != graph_mode:
        raise PassError(f"plan was made with layernorm_streams='{mode}', the graph was analysed with '{graph_mode}'",
                        f"re-analyse it: zoocompiler.run_analysis(gm, layernorm_streams='{mode}')")
    fp = plan.meta.get("fingerprint")
    if fp is not None and fp != graph_fingerprint(gm):
        raise PassError(f"plan was made for another model (graph fingerprint {fp} != {graph_fingerprint(gm)})",
                        "make the plan on this model (plan_by_importance / zoocompile prune without --plan)")
    for s in [plan.strategy, *plan.strategies.values()]:
        if s not in STRATEGIES:
            raise PassError(f"unknown strategy '{s}'", f"use one of: {', '.join(STRATEGIES)}")
    for key in [*plan.keep, *plan.producer_keep, *plan.strategies]:
        if key not in by_key:
            raise PassError(f"plan group '{key}' does not exist in this graph (a plan for another model?)",
                            "make the plan on this model; group keys are listed by plans.group_keys(gm)")
    for key in {*plan.keep, *plan.producer_keep}:
        group = by_key[key]
        keep = plan.keep.get(key)
        if keep is not None:
            _check_indices(key, "keep", list(keep), group.size)
        full = resolved_keep(group, key, plan)
        if key not in plan.keep:
            _check_indices(key, f"{plan.strategy_for(key)} of producer_keep", full, group.size)
        if group.pinned and (len(full) < group.size or key in plan.producer_keep):
            why = group.reasons[0] if group.reasons else "no reason recorded"
            raise PassError(f"group '{key}' is pinned ({why}) and cannot be pruned", "remove it from the plan")
        for d in group.divisible_by:
            if len(full) % d:
                raise PassError(f"group '{key}': keeping {len(full)} units violates divisible_by {d}",
                                f"keep a multiple of {d} units")
        _check_producers(key, group, plan, full)


def _check_producers(key: str, group: UnitGroup, plan: Plan, full: list[int]) -> None:
    per = plan.producer_keep.get(key)
    if per is None:
        return
    known = producers(group)
    for name, idx in per.items():
        if name not in known:
            raise PassError(f"group '{key}': '{name}' is not one of its producers",
                            f"use one of: {', '.join(known) or '(none)'}")
        _check_indices(key, f"producer '{name}'", list(idx), group.size)
        if plan.strategy_for(key) == "pad" and not set(idx) <= set(full):
            raise PassError(f"group '{key}': pad needs producer '{name}' to keep a subset of the group's keep",
                            "set keep to the union of the producers' sets (Plan.with_strategy('pad'))")


# ----------------------------------------------------------------------------- importance


def _tensor(gm: fx.GraphModule, name: str) -> torch.Tensor:
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return gm.get_buffer(name)


def unit_scores(gm: fx.GraphModule, members: list[UnitMember], size: int, importance: str) -> np.ndarray:
    """Per-unit importance from the members' parameter slices: sum |w| (l1) or sqrt(sum w²) (l2)."""
    scores = np.zeros(size, dtype=np.float64)
    params = {n for n, _ in gm.named_parameters()}
    for m in members:
        if m.param is None or m.param not in params:
            continue
        t = _tensor(gm, m.param).detach().double()
        per_pos = t.abs() if importance == "l1" else t.pow(2)
        per_pos = per_pos.transpose(0, m.dim).reshape(t.shape[m.dim], -1).sum(1).numpy()
        for u, idx in enumerate(m.indices):
            scores[u] += per_pos[idx].sum()
    return scores if importance == "l1" else np.sqrt(scores)


def _top(scores: np.ndarray, k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda u: (-scores[u], u))
    return sorted(order[:k])


def _count(size: int, ratio: float, round_to: int | None) -> int:
    k = max(1, int(round(size * (1.0 - ratio))))
    if round_to:
        k = min(max(round_to, round(k / round_to) * round_to), size // round_to * round_to) or size
    return min(k, size)


def _round_set(units: list[int], scores: np.ndarray, round_to: int | None, grow: bool) -> list[int]:
    """Adjust a derived keep set to a multiple of ``round_to`` (growing or shrinking by ``scores``)."""
    size = len(scores)
    if not round_to or len(units) % round_to == 0:
        return units
    up = math.ceil(len(units) / round_to) * round_to
    if (grow and up <= size) or len(units) < round_to:
        target = min(up, size)
        extra = [u for u in _top(scores, size) if u not in set(units)]
        extra = sorted(extra, key=lambda u: (-scores[u], u))[: target - len(units)]
        return sorted(set(units) | set(extra))
    target = len(units) // round_to * round_to
    return sorted(sorted(units, key=lambda u: (-scores[u], u))[:target])


def plan_by_importance(
    gm: fx.GraphModule,
    ratio: float,
    *,
    importance: str = "l1",
    round_to: int | None = None,
    strategy: str = "union",
    seed: int = 0,
    scope: str = "producer",
) -> Plan:
    """Keep the ``1 - ratio`` most important units of every prunable group.

    Importance: l1/l2 norm of each unit's producer-parameter slices, or seeded random scores.
    ``scope="producer"``: multi-producer groups get per-producer choices (each producer its own
    top units, by its own weights) and ``keep`` = their union (``union``/``pad``) or intersection.
    ``scope="group"``: one choice per group from the summed importance of all its producers, so
    every producer keeps the same ``1 - ratio`` units (what Torch-Pruning's group pruning does;
    the strategies then coincide). ``round_to=N`` keeps every count a multiple of N (never 0,
    never more than the group size).
    """
    if not 0.0 <= ratio < 1.0:
        raise PassError(f"prune ratio {ratio} is out of range", "use a ratio in [0, 1), e.g. 0.5")
    if importance not in IMPORTANCES:
        raise PassError(f"unknown importance '{importance}'", f"use one of: {', '.join(IMPORTANCES)}")
    if strategy not in STRATEGIES:
        raise PassError(f"unknown strategy '{strategy}'", f"use one of: {', '.join(STRATEGIES)}")
    if round_to is not None and round_to < 1:
        raise PassError(f"round_to={round_to} is not a positive integer", "use e.g. round_to=8")
    if scope not in ("producer", "group"):
        raise PassError(f"unknown importance scope '{scope}'", "use 'producer' or 'group'")
    keys = group_keys(gm)
    plan = Plan(strategy=strategy)

    def scores(members: list[UnitMember], size: int, tag: str) -> np.ndarray:
        if importance == "random":
            rng = random.Random(f"{seed}:{tag}")
            return np.array([rng.random() for _ in range(size)])
        return unit_scores(gm, members, size, importance)

    for g in graph_info(gm).unit_groups:
        if g.pinned:
            continue
        key = keys[g.gid]
        k = _count(g.size, ratio, round_to)
        group_scores = scores([m for m in g.members if m.role in PRODUCER_ROLES], g.size, key)
        prods = producers(g)
        if len(prods) < 2 or scope == "group":
            plan.keep[key] = _top(group_scores, k)
            continue
        per = {name: _top(scores(ms, g.size, f"{key}:{name}"), k) for name, ms in prods.items()}
        plan.producer_keep[key] = per
        derived = derive_keep(per, strategy) or _top(group_scores, round_to or 1)
        keep = _round_set(derived, group_scores, round_to, grow=strategy != "intersection")
        plan.keep[key] = keep
        if strategy == "pad":  # a shrunk union: producers keep only units the group keeps
            plan.producer_keep[key] = {p: sorted(set(v) & set(keep)) or keep[:1] for p, v in per.items()}
    x = graph_info(gm).example_input
    plan.meta = {
        "ratio": ratio,
        "importance": importance,
        "round_to": round_to,
        "seed": seed,
        "strategy": strategy,
        "scope": scope,
        "fingerprint": graph_fingerprint(gm),
        "input_shape": list(x.shape[1:]) if x is not None else None,
        "layernorm_streams": layernorm_streams_of(gm),
    }
    return plan
