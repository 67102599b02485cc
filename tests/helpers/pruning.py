"""Prune / slicing test helpers: randomised weights, random and reference plans, exact parameter counts,
output comparison and before/after snapshots of a graph."""

from __future__ import annotations

import copy
import random

import torch
import torch.nn as nn

from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis.plans import Plan, graph_fingerprint, group_keys, groups_by_key, producers


def randomized(gm: torch.fx.GraphModule, seed: int = 1) -> torch.fx.GraphModule:
    """A copy of ``gm`` with non-trivial norms and no near-zero parameters (zero-init heads, 1e-6
    layer scales), so a removed unit is visible at the output."""
    gm = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gm.parameters():
            if p.abs().max() < 1e-2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in gm.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return gm


def random_plan(gm: torch.fx.GraphModule, seed: int, strategy: str = "union") -> Plan:
    """Every prunable group keeps a random 25/50/75 % of its units; multi-producer groups get random
    per-producer sets (keep = union, or intersection)."""
    rng = random.Random(seed)
    keys = group_keys(gm)
    plan = Plan(strategy=strategy, meta={"fingerprint": graph_fingerprint(gm)})
    for g in graph_info(gm).unit_groups:
        if g.pinned or g.size < 2:
            continue
        key = keys[g.gid]
        frac = rng.choice([0.25, 0.5, 0.75])
        k = max(1, round(g.size * (1 - frac)))
        prods = producers(g)
        if len(prods) >= 2:
            per = {p: sorted(rng.sample(range(g.size), k)) for p in prods}
            if strategy == "intersection":
                common = sorted(rng.sample(range(g.size), max(1, k // 2)))
                per = {p: sorted(set(v) | set(common)) for p, v in per.items()}
            plan.producer_keep[key] = per
        else:
            plan.keep[key] = sorted(rng.sample(range(g.size), k))
    return plan.with_strategy(strategy) if plan.producer_keep else plan


def expected_params(gm: torch.fx.GraphModule, plan: Plan) -> int:
    """Parameter count after pruning by a union/intersection plan, from the plan and the members alone."""
    keep_of = {}
    for key, g in groups_by_key(gm).items():
        if key in plan.keep:
            keep_of[g.gid] = set(plan.keep[key])
    removed: dict[tuple[str, int], set[int]] = {}
    for g in graph_info(gm).unit_groups:
        if g.gid not in keep_of:
            continue
        for m in g.members:
            if m.param is not None:
                gone = [p for u in range(g.size) if u not in keep_of[g.gid] for p in m.indices[u]]
                removed.setdefault((m.param, m.dim), set()).update(gone)
    total = 0
    for name, p in gm.named_parameters():
        n = 1
        for d, s in enumerate(p.shape):
            n *= s - len(removed.get((name, d), ()))
        total += n
    return total


def assert_close(a: torch.Tensor, b: torch.Tensor, ref_scale: float, atol: float = 1e-5) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= atol * max(1.0, ref_scale), f"max |diff| {diff:.3g} (scale {ref_scale:.3g})"


def state_snapshot(gm: torch.fx.GraphModule) -> tuple[str, dict[str, torch.Tensor]]:
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}


def assert_unchanged(gm: torch.fx.GraphModule, snap: tuple[str, dict[str, torch.Tensor]]) -> None:
    code, state = snap
    assert gm.code == code
    now = gm.state_dict()
    assert now.keys() == state.keys()
    assert all(now[k].shape == v.shape and torch.equal(now[k], v) for k, v in state.items())
