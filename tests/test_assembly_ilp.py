"""The DeRy assembly ILP against brute force over every valid assembly of small random zoos."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

from zoocompiler.core.budget import Budget
from zoocompiler.core.errors import SolverError, ZooError
from zoocompiler.solvers.assembly_ilp import (
    Assembly,
    BlockOption,
    InfeasibleBudgetError,
    JoinCost,
    cheapest,
    solve_assemblies,
)

TOL = 1e-7
METRICS = ("params", "macs", "latency_ms")


def random_zoo(seed: int, models: int, stages: int, latency: bool = True, ties: bool = False):
    """Each model is cut into ``stages`` blocks whose sets are a random permutation of 0..K-1.

    ``ties``: qualities and compatibilities from {0, 1} and {0, 0.5}, so many assemblies share a surrogate.
    """
    rng = np.random.default_rng(seed)
    blocks = []
    for m in range(models):
        sets = rng.permutation(stages) if rng.random() < 0.5 else np.arange(stages)
        for k in range(stages):
            blocks.append(
                BlockOption(
                    key=f"m{m}[{k}]",
                    stage=k,
                    set=int(sets[k]),
                    params=float(rng.integers(1, 1000)) * 1e3,
                    macs=float(rng.uniform(1e6, 1e8)),
                    latency_ms=float(rng.uniform(0.1, 2.0)) if latency else None,
                    quality=float(rng.integers(0, 2)) if ties else float(rng.normal()),
                )
            )
    by_stage = [[i for i, b in enumerate(blocks) if b.stage == k] for k in range(stages)]
    joins = {
        (a, b): JoinCost(
            params=float(rng.integers(0, 50)) * 1e3,
            macs=float(rng.uniform(0, 1e6)),
            latency_ms=float(rng.uniform(0, 0.2)) if latency else None,
            compat=float(rng.integers(0, 2)) / 2 if ties else float(rng.uniform()),
        )
        for k in range(stages - 1)
        for a in by_stage[k]
        for b in by_stage[k + 1]
    }
    heads = {
        b: JoinCost(params=float(rng.integers(1, 20)) * 1e3, macs=1e4, latency_ms=0.05 if latency else None)
        for b in by_stage[-1]
    }
    return blocks, joins, heads


def brute_force(blocks, joins, heads, compat_weight: float) -> list[tuple[tuple[int, ...], float, dict]]:
    """Every assembly with one block per stage and per set: (blocks, surrogate, totals)."""
    stages = max(b.stage for b in blocks) + 1
    by_stage = [[i for i, b in enumerate(blocks) if b.stage == k] for k in range(stages)]
    out = []
    for chosen in itertools.product(*by_stage):
        if len({blocks[i].set for i in chosen}) != stages:
            continue
        links = list(zip(chosen, chosen[1:]))
        value = sum(blocks[i].quality for i in chosen) + compat_weight * sum(joins[p].compat for p in links)
        totals = {}
        for metric in METRICS:
            parts = [getattr(blocks[i], metric) for i in chosen] + [getattr(joins[p], metric) for p in links]
            parts.append(getattr(heads[chosen[-1]], metric))
            totals[metric] = None if None in parts else sum(parts)
        out.append((tuple(chosen), value, totals))
    return out


def within(totals: dict, budget: Budget) -> bool:
    return all(totals[m] <= bound for m, bound in budget.to_dict().items())


def quantile_budget(rng, candidates, metrics) -> Budget:
    """A budget at random quantiles of the candidates' totals (loose or tight, sometimes infeasible jointly)."""
    values = {}
    for metric in metrics:
        totals = sorted(c[2][metric] for c in candidates)
        values[metric] = float(np.quantile(totals, rng.uniform(0.05, 1.0))) * (1 + 1e-6)
    return Budget(**values)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_top_assemblies_match_brute_force(seed, ties):
    rng = np.random.default_rng(1000 + seed)
    models, stages = int(rng.integers(2, 6)), int(rng.integers(1, 5))
    blocks, joins, heads = random_zoo(seed, models, stages, ties=ties)
    compat_weight = float(rng.choice([0.0, 0.5, 1.0, 2.0]))
    every = brute_force(blocks, joins, heads, compat_weight)
    assert every, "each model alone is a valid assembly (its sets are a permutation)"
    metrics = [m for m in METRICS if rng.random() < 0.6] or ["params"]
    budget = quantile_budget(rng, every, metrics)
    feasible = sorted((c for c in every if within(c[2], budget)), key=lambda c: -c[1])
    top = int(rng.integers(1, 9))
    if not feasible:
        with pytest.raises(InfeasibleBudgetError):
            solve_assemblies(blocks, joins, heads, budget, top=top, compat_weight=compat_weight)
        return
    found, stats = solve_assemblies(blocks, joins, heads, budget, top=top, compat_weight=compat_weight)

    expected = feasible[:top]
    assert len(found) == len(expected)
    assert stats.status == ("optimal" if len(feasible) >= top else "exhausted")
    assert stats.cuts == stats.solves - (stats.status == "exhausted")
    assert found[0].surrogate == pytest.approx(feasible[0][1], abs=TOL)
    values = [a.surrogate for a in found]
    assert all(x >= y - TOL for x, y in zip(values, values[1:])), "solve order is non-increasing"
    assert sorted(values) == pytest.approx(sorted(c[1] for c in expected), abs=TOL)
    # as sets, up to ties at the boundary value
    boundary = expected[-1][1]
    chosen = {a.blocks for a in found}
    assert len(chosen) == len(found)
    assert {c[0] for c in expected if c[1] > boundary + TOL} <= chosen
    by_blocks = {c[0]: c for c in every}
    for assembly in found:
        _, value, totals = by_blocks[assembly.blocks]  # a valid assembly: one block per stage and per set
        assert assembly.surrogate == pytest.approx(value, abs=TOL)
        for metric in METRICS:
            assert getattr(assembly, metric) == pytest.approx(totals[metric], rel=1e-12)
        assert within(totals, budget)


def test_cheapest_and_infeasible_budget_report_brute_force_minimum():
    blocks, joins, heads = random_zoo(7, models=3, stages=3)
    every = brute_force(blocks, joins, heads, 1.0)
    least = {m: min(c[2][m] for c in every) for m in METRICS}
    for metric in METRICS:
        assert cheapest(blocks, joins, heads, metric) == pytest.approx(least[metric], rel=1e-12)
    assert cheapest(blocks, joins, heads, "flops") == pytest.approx(least["macs"], rel=1e-12)

    budget = Budget(params=least["params"] * 0.5, macs=least["macs"] * 2)
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_assemblies(blocks, joins, heads, budget)
    err = info.value
    assert isinstance(err, SolverError)
    assert err.budget == budget
    assert set(err.minimum) == set(METRICS)
    for metric in METRICS:
        assert err.minimum[metric] == pytest.approx(least[metric], rel=1e-12)
    assert "params=" in str(err) and "flops=" in str(err) and "latency=" in str(err) and "raise" in str(err)


def test_infeasible_message_rounds_minimum_up_and_omits_unknown_latency():
    blocks = [BlockOption("a[0:1]", 0, 0, params=1_234_567, macs=35_100_000)]
    heads = {0: JoinCost()}
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_assemblies(blocks, {}, heads, Budget(params=1e6))
    assert info.value.minimum == {"params": 1_234_567, "macs": 35_100_000}
    assert "params=1.24M, flops=35.1M" in str(info.value)  # 1.234567M rounded *up*: 1.23M would not fit


def test_each_metric_fits_alone_but_not_together():
    blocks = [BlockOption("a", 0, 0, params=1, macs=10), BlockOption("b", 0, 0, params=10, macs=1)]
    heads = {0: JoinCost(), 1: JoinCost()}
    with pytest.raises(InfeasibleBudgetError, match="at once") as info:
        solve_assemblies(blocks, {}, heads, Budget(params=5, macs=5))
    assert info.value.minimum == {"params": 1, "macs": 1}
    found, _ = solve_assemblies(blocks, {}, heads, Budget(params=5))
    assert [a.blocks for a in found] == [(0,)]


def test_sets_that_cannot_cover_the_stages_are_a_structural_error():
    # set 0 only at stages 1 and 2, sets 1 and 2 only at stage 0: stages 1 and 2 both need set 0
    blocks = [
        BlockOption("x0", 0, 1, 1, 1),
        BlockOption("y0", 0, 2, 1, 1),
        BlockOption("x1", 1, 0, 1, 1),
        BlockOption("x2", 2, 0, 1, 1),
    ]
    joins = {(0, 2): JoinCost(), (1, 2): JoinCost(), (2, 3): JoinCost()}
    with pytest.raises(SolverError, match="do not cover the stages") as info:
        solve_assemblies(blocks, joins, {3: JoinCost()}, Budget())
    assert not isinstance(info.value, InfeasibleBudgetError)
    assert "seed" in str(info.value)
    empty_set = [BlockOption("x0", 0, 0, 1, 1), BlockOption("x1", 1, 0, 1, 1)]
    with pytest.raises(SolverError, match="set 1 has no block"):
        solve_assemblies(empty_set, {}, {1: JoinCost()}, Budget())


def test_missing_join_or_head_is_an_error_naming_it():
    blocks, joins, heads = random_zoo(3, models=2, stages=2)
    (a, b) = next(p for p in joins if blocks[p[0]].set != blocks[p[1]].set)
    partial = {p: j for p, j in joins.items() if p != (a, b)}
    with pytest.raises(SolverError, match=re.escape(f"no join cost for blocks '{blocks[a].key}' → '{blocks[b].key}'")):
        solve_assemblies(blocks, partial, heads, Budget())
    last = next(iter(heads))
    with pytest.raises(SolverError, match=re.escape(f"no head cost for last-stage block '{blocks[last].key}'")):
        solve_assemblies(blocks, joins, {k: v for k, v in heads.items() if k != last}, Budget())
    # pairs inside one set can never be chosen together, so their joins may be left out; extra keys are ignored
    same_set = {p: j for p, j in joins.items() if blocks[p[0]].set != blocks[p[1]].set}
    same_set[(0, 0)] = JoinCost()
    found, _ = solve_assemblies(blocks, same_set, heads, Budget(), top=50)
    assert len(found) == len(brute_force(blocks, joins, heads, 1.0))


def test_latency_budget_needs_every_latency():
    blocks, joins, heads = random_zoo(5, models=2, stages=2, latency=False)
    with pytest.raises(SolverError, match="latency"):
        solve_assemblies(blocks, joins, heads, Budget(latency_ms=10))
    with pytest.raises(SolverError, match="latency"):
        cheapest(blocks, joins, heads, "latency_ms")
    found, _ = solve_assemblies(blocks, joins, heads, Budget(params=1e9))
    assert found[0].latency_ms is None and found[0].params > 0
    blocks, joins, heads = random_zoo(5, models=2, stages=2)
    heads[next(iter(heads))] = JoinCost(params=1.0)
    with pytest.raises(SolverError, match="head of"):
        solve_assemblies(blocks, joins, heads, Budget(latency_ms=10))


def test_invalid_inputs():
    blocks, joins, heads = random_zoo(2, models=2, stages=2)
    with pytest.raises(SolverError, match="not unique"):
        solve_assemblies([*blocks, blocks[0]], joins, heads, Budget())
    with pytest.raises(SolverError, match="outside 0..1"):
        solve_assemblies([*blocks, BlockOption("z", 1, 5, 1, 1)], joins, heads, Budget())
    with pytest.raises(SolverError, match="params=-1"):
        solve_assemblies([BlockOption("n", 0, 0, -1, 1)], {}, {0: JoinCost()}, Budget())
    with pytest.raises(SolverError, match="no candidate blocks"):
        solve_assemblies([], {}, {}, Budget())
    with pytest.raises(SolverError, match="time_limit"):
        solve_assemblies(blocks, joins, heads, Budget(), time_limit=0)
    with pytest.raises(SolverError, match="unknown cost metric"):
        cheapest(blocks, joins, heads, "energy")


def test_no_budget_enumerates_every_assembly():
    blocks, joins, heads = random_zoo(11, models=3, stages=3)
    every = brute_force(blocks, joins, heads, 1.0)
    found, stats = solve_assemblies(blocks, joins, heads, Budget(), top=len(every) + 5)
    assert stats.status == "exhausted"
    assert sorted(a.blocks for a in found) == sorted(c[0] for c in every)
    assert stats.solves == len(every) + 1 and stats.cuts == len(every)


@pytest.mark.parametrize("seed", range(8))
def test_forbidden_pairs_are_never_chosen(seed):
    """Pairs that cannot be joined (no stitch exists) drop out; the rest is still the brute-force optimum."""
    blocks, joins, heads = random_zoo(100 + seed, models=3, stages=3)
    rng = np.random.default_rng(seed)
    pairs = sorted(joins)
    forbidden = {pairs[i] for i in rng.choice(len(pairs), size=len(pairs) // 3, replace=False)}
    allowed = [c for c in brute_force(blocks, joins, heads, 1.0) if not set(zip(c[0], c[0][1:])) & forbidden]
    if not allowed:
        with pytest.raises(SolverError):
            solve_assemblies(blocks, joins, heads, Budget(), forbidden=forbidden)
        return
    found, _ = solve_assemblies(blocks, joins, heads, Budget(), top=len(allowed) + 3, forbidden=forbidden)
    assert sorted(a.blocks for a in found) == sorted(c[0] for c in allowed)
    assert math.isclose(found[0].surrogate, max(c[1] for c in allowed), abs_tol=TOL)
    assert math.isclose(
        cheapest(blocks, joins, heads, "params", forbidden=forbidden), min(c[2]["params"] for c in allowed)
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("params=1.5M,flops=60M,latency=2ms", Budget(params=1.5e6, macs=6e7, latency_ms=2.0)),
        ("macs=2G", Budget(macs=2e9)),
        ("flops=300k", Budget(macs=3e5)),
        (" params = 300K , latency = 0.5s ", Budget(params=3e5, latency_ms=500.0)),
        ("latency=3", Budget(latency_ms=3.0)),
        ("params=1e6", Budget(params=1e6)),
        ("PARAMS=.5M", Budget(params=5e5)),
    ],
)
def test_budget_parse(text, expected):
    assert Budget.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "foo=1",
        "params",
        "params=abc",
        "params=-1",
        "params=0",
        "params=1.5X",
        "params=1.5m",
        "latency=2us",
        "latency=2M",
        "params=1,params=2",
        "flops=1M,macs=2M",
        "params=1M;flops=2M",
    ],
)
def test_budget_parse_errors_show_the_grammar(text):
    with pytest.raises(ZooError, match=r"e\.g\. 'params=1\.5M,flops=60M,latency=2ms'"):
        Budget.parse(text)


def test_budget_and_assembly_serialise():
    budget = Budget.parse("params=1.5M,flops=60M")
    assert budget.to_dict() == {"params": 1.5e6, "macs": 6e7}
    assert str(budget) == "params=1.5M,flops=60M"
    assert Budget.parse(str(Budget(params=1234.5, latency_ms=2.5))) == Budget(params=1234.5, latency_ms=2.5)
    with pytest.raises(ZooError, match="not a positive number"):
        Budget(params=math.nan)
    assembly = Assembly((0, 3), 1.5, 10.0, 20.0, None)
    assert assembly.to_dict() == {"blocks": [0, 3], "surrogate": 1.5, "params": 10.0, "macs": 20.0, "latency_ms": None}


def test_thirty_model_zoo_top20():
    """The size of the paper's zoo: 30 models, K=4, 120 blocks, up to 3×900 pair variables."""
    blocks, joins, heads = random_zoo(0, models=30, stages=4)
    assert len(blocks) == 120 and len(joins) == 3 * 900
    budget = Budget(params=2.0e6, macs=2.4e8, latency_ms=5.0)
    found, stats = solve_assemblies(blocks, joins, heads, budget, top=20)
    assert len(found) == 20 and stats.status == "optimal" and stats.solves == 20
    values = [a.surrogate for a in found]
    assert all(x >= y - TOL for x, y in zip(values, values[1:]))
    assert len({a.blocks for a in found}) == 20
    for a in found:
        assert sorted(blocks[i].stage for i in a.blocks) == [0, 1, 2, 3]
        assert sorted(blocks[i].set for i in a.blocks) == [0, 1, 2, 3]
        assert a.params <= budget.params and a.macs <= budget.macs and a.latency_ms <= budget.latency_ms
    # spot-check optimality: no single-block swap of the best assembly that fits the budget does better
    best = found[0]
    every = {c[0]: c for c in brute_force_neighbours(blocks, joins, heads, best.blocks)}
    assert all(v <= best.surrogate + TOL for _, v, t in every.values() if within(t, budget))


def brute_force_neighbours(blocks, joins, heads, chosen):
    """Assemblies that differ from ``chosen`` in one stage (valid ones only)."""
    out = []
    for k, current in enumerate(chosen):
        for i, b in enumerate(blocks):
            if b.stage != k or i == current:
                continue
            candidate = list(chosen)
            candidate[k] = i
            if len({blocks[j].set for j in candidate}) != len(candidate):
                continue
            sub = [blocks[j] for j in candidate]
            remap = dict(enumerate(candidate))
            sub_joins = {(s, s + 1): joins[(remap[s], remap[s + 1])] for s in range(len(candidate) - 1)}
            sub_heads = {len(candidate) - 1: heads[candidate[-1]]}
            ((_, value, totals),) = brute_force(sub, sub_joins, sub_heads, 1.0)
            out.append((tuple(candidate), value, totals))
    return out
