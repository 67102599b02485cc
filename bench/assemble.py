"""DeRy benchmark: solver scaling, DP vs swap partition, ILP + NASWOT vs random search, proxy quality, budgets.

Usage::

    python bench/assemble.py                # full run (~3 min on 2 cores; see docs/bench_assemble.md)
    python bench/assemble.py --quick        # smoke version (~1-2 min): fewer zoo sizes, candidates and epochs
    python bench/assemble.py --sizes 5,10,30 --budgets flops=1M params=100k,flops=4M --epochs 3 --tune full
    python bench/assemble.py --render-only  # re-print the tables and redraw the plot from the JSON

Five measurements, one run:

1. **solver scaling** on synthetic zoos (``synthetic_zoo``): N models × 40 cut points, each position a noisy
   unit vector drifting through K hidden stage directions along a per-model warped depth, C = clip(Gram, 0, 1);
   synthetic params/MACs per segment and per stitch. Times ``partition_zoo`` (dp, K=4, eps=0.2, R=200) and
   ``solve_assemblies`` (top 20) under a medium budget (the median zoo model's params and MACs).
2. **dp vs swap** partition step on the same zoos: objective and seconds at equal restarts, and swap with the
   restarts that fit in dp's wall time.
3. **ILP + NASWOT re-rank vs random search** on the demo zoo (mnist5k): ``solve`` + ``rank_candidates`` against
   uniform sampling (without replacement) of the assemblies valid for the same partition and budget (one block
   per set and per stage, joinable, within budget; enumerated exhaustively), each built and scored with NASWOT
   on the same batches; best proxy within the ILP's wall time, and after all ``--random-candidates``; for each
   of ``--search-budgets``.
4. **Kendall τ** between NASWOT (and the ILP surrogate) and frozen-tuned test accuracy of the ILP top
   ``--tau-top`` under a loose budget.
5. **assembled vs single zoo models** within each of ``--budgets``: the chosen assembly (frozen tuning) against
   every zoo model whose own params/MACs fit, with (a) its reported accuracy and (b) the same protocol (its body,
   a fresh linear-probe head, frozen tuning for the same epochs, 10 classes); with ``--full-tuning`` (default)
   every network is also fully tuned for the same epochs from the same start.

Prints rich tables, writes ``bench/results/assemble.json`` and ``bench/results/assemble.png`` (solver time vs
zoo size; NASWOT vs accuracy) atomically. Torch runs on ``--threads`` (default 1) intra-op threads.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import itertools
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pulp
import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table
from scipy.stats import kendalltau

from zoocompiler.core.atomic import atomic_path, write_json_atomic
from zoocompiler.core.budget import BUDGET_TOLERANCE, Budget
from zoocompiler.core.modules import count_params
from zoocompiler.passes.rewrite.compose import ChosenBlock, ProbeActivations, build_assembly, build_body
from zoocompiler.pipelines.assemble.naswot import naswot
from zoocompiler.pipelines.assemble.pipeline import (
    AssembleConfig,
    ZooAnalysis,
    _naswot_batches,
    analyse_zoo,
    model_macs,
    rank_candidates,
    solve,
    tune,
)
from zoocompiler.pipelines.assemble.problem import AssemblyOptions, assembly_options
from zoocompiler.solvers.assembly_ilp import BlockOption, JoinCost, solve_assemblies
from zoocompiler.solvers.partition import ModelPositions, Partition, partition_zoo
from zoocompiler.training import evaluate
from zoocompiler.zoo import get_entry

RESULTS = Path(__file__).resolve().parent / "results"
SCALING_TARGET_S = 10.0  # 30 models, partition + ILP top-20
TARGET_MODELS = 30
Log = Callable[[str], None]


# ----------------------------------------------------------------------------- 1-2: synthetic zoos


@dataclass
class SyntheticZoo:
    """A zoo as the solvers see it: similarity over all positions, segment sizes, widths and stitch costs."""

    C: np.ndarray  # (P, P) float64, symmetric, diagonal 1, in [0, 1]
    models: list[ModelPositions]  # segment sizes = params
    segment_macs: list[np.ndarray]  # per model, (L,) MACs of each segment
    widths: list[np.ndarray]  # per model, (L+1,) channels at each position
    spatial: list[np.ndarray]  # per model, (L+1,) H·W at each position
    accuracy: np.ndarray  # (N,) the "source accuracy" of each model
    num_classes: int = 10


def synthetic_zoo(n_models: int, positions: int = 40, k: int = 4, dim: int = 64, noise: float = 0.5, seed: int = 0):
    """N models with ``positions`` cut points each (L = positions, plus the shared input position 0).

    Segment params: a conv (log-normal size, per-model scale) with probability 0.6, else a parameter-free op.
    Hidden structure: K orthonormal stage directions u_0..u_{K-1}; position p of model i lies at depth
    s = K·f(p)^γ_i, f = its cumulative share of the model's params and γ_i ∈ [0.7, 1.4] a per-model warp, and
    its vector is Σ_j exp(-((s - j - ½)/0.45)²) u_j plus isotropic noise of norm ≈ ``noise``, normalised. The
    input (position 0) is one vector shared by every model. Width doubles and H·W quarters at each hidden stage
    (32×32 input); segment MACs = params × H·W; a stitch is a 1×1 conv between the two widths.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, k + 1)))
    stages, image = basis.T[:k], basis.T[k]
    vectors, models, seg_macs, widths, spatial = [], [], [], [], []
    offset = 0
    for _ in range(n_models):
        conv = rng.random(positions) < 0.6
        conv[-1] = True
        params = np.where(conv, np.round(rng.lognormal(0.0, 0.6, positions) * rng.uniform(5e3, 3e4)), 0.0)
        share = np.concatenate([[0.0], np.cumsum(params)]) / params.sum()
        depth = np.minimum(k * share ** rng.uniform(0.7, 1.4), k - 1e-9)  # positions 0..L
        weights = np.exp(-(((depth[:, None] - np.arange(k)[None, :] - 0.5) / 0.45) ** 2))
        v = weights @ stages + noise * rng.normal(size=(positions + 1, dim)) / math.sqrt(dim)
        v[0] = image
        vectors.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        stage = np.floor(depth).astype(np.int64)
        width = rng.choice([8, 12, 16, 24, 32]) * 2**stage
        width[0] = 3
        area = (32 // 2**stage) ** 2
        models.append(ModelPositions(f"m{len(models)}", offset, tuple(params.tolist())))
        seg_macs.append(params * area[1:])
        widths.append(width)
        spatial.append(area)
        offset += positions + 1
    V = np.concatenate(vectors)
    C = np.clip(V @ V.T, 0.0, 1.0)
    np.fill_diagonal(C, 1.0)
    accuracy = rng.uniform(0.70, 0.95, size=n_models)
    return SyntheticZoo(C, models, seg_macs, widths, spatial, accuracy)


def synthetic_ilp_data(zoo: SyntheticZoo, partition: Partition):
    """ILP input for a partition of a synthetic zoo: (blocks, joins, heads, budget).

    Block quality = source accuracy / K; a join of two blocks contiguous in one model is free with compat 1,
    any other a 1×1 stitch with compat C[out(a), in(b)]; head = linear from the last width to 10 classes.
    Budget: the median over models of its own params and MACs (blocks plus head), a medium budget.
    """
    refs = partition.blocks()
    blocks = []
    for r in refs:
        m = zoo.models[r.model]
        blocks.append(
            BlockOption(
                key=f"{m.name}[{r.start}:{r.end}]",
                stage=r.stage,
                set=partition.set_of(r),
                params=float(sum(m.segment_sizes[r.start : r.end])),
                macs=float(zoo.segment_macs[r.model][r.start : r.end].sum()),
                quality=float(zoo.accuracy[r.model]) / partition.k,
            )
        )
    joins: dict[tuple[int, int], JoinCost] = {}
    for i, a in enumerate(refs):
        for j, b in enumerate(refs):
            if b.stage != a.stage + 1:
                continue
            if a.model == b.model and a.end == b.start:
                joins[i, j] = JoinCost(0.0, 0.0, None, 1.0)
                continue
            params = float(zoo.widths[a.model][a.end] * zoo.widths[b.model][b.start])
            compat = zoo.C[zoo.models[a.model].offset + a.end, zoo.models[b.model].offset + b.start]
            joins[i, j] = JoinCost(params, params * float(zoo.spatial[b.model][b.start]), None, float(compat))
    heads = {}
    for i, r in enumerate(refs):
        if r.stage == partition.k - 1:
            params = float(zoo.widths[r.model][r.end] * zoo.num_classes + zoo.num_classes)
            heads[i] = JoinCost(params, params)
    whole_params = [m.total_size + zoo.widths[i][-1] * zoo.num_classes for i, m in enumerate(zoo.models)]
    whole_macs = [zoo.segment_macs[i].sum() + zoo.widths[i][-1] * zoo.num_classes for i in range(len(zoo.models))]
    budget = Budget(params=float(np.median(whole_params)), macs=float(np.median(whole_macs)))
    return blocks, joins, heads, budget


def bench_scaling(sizes: Sequence[int], restarts: int, top: int, seed: int, log: Log) -> tuple[list[dict], dict]:
    """Solver scaling rows (one per zoo size) and the synthetic zoos' partitions (reused by dp vs swap)."""
    rows, zoos = [], {}
    for n in sizes:
        zoo = synthetic_zoo(n, seed=seed + n)
        t = time.perf_counter()
        part = partition_zoo(zoo.C, zoo.models, k=4, eps=0.2, restarts=restarts, seed=seed, method="dp")
        partition_s = time.perf_counter() - t
        blocks, joins, heads, budget = synthetic_ilp_data(zoo, part)
        t = time.perf_counter()
        found, stats = solve_assemblies(blocks, joins, heads, budget, top=top)
        ilp_s = time.perf_counter() - t
        relaxed = sum(e > 0.2 + 1e-12 for e in part.effective_eps)
        rows.append(
            {
                "models": n,
                "positions": n * (zoo.models[0].length + 1),
                "blocks": len(blocks),
                "restarts": restarts,
                "relaxed_eps_models": int(relaxed),
                "partition_objective": part.objective,
                "partition_s": partition_s,
                "ilp_variables": stats.variables,
                "ilp_status": stats.status,
                "ilp_found": len(found),
                "ilp_best_surrogate": found[0].surrogate,
                "budget": budget.to_dict(),
                "ilp_s": ilp_s,
                "total_s": partition_s + ilp_s,
            }
        )
        zoos[n] = zoo
        log(f"scaling: {n} models, partition {partition_s:.2f} s, ILP top-{top} {ilp_s:.2f} s ({stats.status})")
    return rows, zoos


def bench_dp_vs_swap(zoos: dict, sizes: Sequence[int], restarts: int, seed: int, log: Log) -> list[dict]:
    """Per zoo size: dp and swap at ``restarts``, and swap with as many restarts as fit in dp's wall time."""
    rows = []
    for n in sizes:
        zoo = zoos.get(n) or synthetic_zoo(n, seed=seed + n)
        runs: dict[str, Partition] = {}
        for method in ("dp", "swap"):
            runs[method] = partition_zoo(zoo.C, zoo.models, k=4, eps=0.2, restarts=restarts, seed=seed, method=method)
        per_restart = runs["swap"].seconds / restarts
        matched = max(1, int(runs["dp"].seconds / per_restart))
        runs["swap@dp-time"] = partition_zoo(
            zoo.C, zoo.models, k=4, eps=0.2, restarts=matched, seed=seed, method="swap"
        )
        best = max(p.objective for p in runs.values())
        for name, p in runs.items():
            objectives = np.asarray(p.restart_objectives)
            rows.append(
                {
                    "models": n,
                    "method": name,
                    "restarts": len(objectives),
                    "objective": p.objective,
                    "gap_to_best": best - p.objective,
                    "mean_restart_objective": float(objectives.mean()),
                    "restarts_within_1pct": int(np.sum(objectives >= p.objective - 0.01 * abs(p.objective))),
                    "seconds": p.seconds,
                }
            )
            log(f"dp vs swap: {n} models, {name} R={len(objectives)}: J={p.objective:.4f} in {p.seconds:.2f} s")
    return rows


# ----------------------------------------------------------------------------- 3: ILP + NASWOT vs random search


def _quiet() -> contextlib.AbstractContextManager:
    """Silence tqdm bars and library chatter on stderr (the bench logs its own progress)."""
    return contextlib.redirect_stderr(io.StringIO())


def assembly_totals(opts: AssemblyOptions, combo: Sequence[int]) -> dict[str, float]:
    """Params and MACs of blocks + joins + head of one assembly (what the ILP's budget rows count)."""
    links = list(zip(combo, combo[1:]))
    totals = {}
    for metric in ("params", "macs"):
        value = sum(getattr(opts.options[i], metric) for i in combo)
        value += sum(getattr(opts.joins[p], metric) for p in links) + getattr(opts.heads[combo[-1]], metric)
        totals[metric] = float(value)
    return totals


def surrogate(opts: AssemblyOptions, combo: Sequence[int]) -> float:
    """The ILP objective of one assembly (compat weight 1)."""
    links = list(zip(combo, combo[1:]))
    return sum(opts.options[i].quality for i in combo) + sum(opts.joins[p].compat for p in links)


def valid_assemblies(opts: AssemblyOptions, budget: Budget) -> list[tuple[int, ...]]:
    """Every assembly the ILP may return: one block per stage and per set, joinable pairs, within the budget."""
    if budget.latency_ms is not None:
        raise ValueError("the random-search baseline enumerates params/MACs budgets only")
    k = max(o.stage for o in opts.options) + 1
    by_stage = [[i for i, o in enumerate(opts.options) if o.stage == s] for s in range(k)]
    forbidden = set(opts.forbidden)
    limits = budget.to_dict()
    out = []
    for combo in itertools.product(*by_stage):
        if len({opts.options[i].set for i in combo}) != k:
            continue
        links = list(zip(combo, combo[1:]))
        if any(p in forbidden or p not in opts.joins for p in links):
            continue
        totals = assembly_totals(opts, combo)
        if all(totals[m] <= bound * (1 + BUDGET_TOLERANCE) for m, bound in limits.items()):
            out.append(combo)
    return out


def bench_search(
    analysis: ZooAnalysis, config: AssembleConfig, max_candidates: int, seed: int, log: Log
) -> dict[str, Any]:
    """ILP top-M + NASWOT re-rank against uniform random search over the valid assemblies (same batches)."""
    members = analysis.members_by_name
    t = time.perf_counter()
    opts, assemblies, stats = solve(analysis, config)
    ilp_s = time.perf_counter() - t
    ranked = rank_candidates(analysis, opts, assemblies, config)
    ilp_total_s = time.perf_counter() - t
    ilp_best = ranked[0]
    log(
        f"search: ILP top-{len(assemblies)} {ilp_s:.2f} s + NASWOT re-rank = {ilp_total_s:.2f} s, "
        f"best NASWOT {ilp_best.naswot:.2f}"
    )

    t0 = time.perf_counter()
    opts_r = assembly_options(analysis.partition, analysis.members, analysis.similarity, analysis.train.num_classes)
    valid = valid_assemblies(opts_r, config.budget)
    enumerate_s = time.perf_counter() - t0
    order = np.random.default_rng(seed).permutation(len(valid))[:max_candidates]
    probes = ProbeActivations(members, analysis.probe)
    batches = _naswot_batches(analysis.train, config)
    trace: list[tuple[float, float]] = []
    scores: dict[tuple[int, ...], float] = {}
    for idx in order:
        combo = valid[idx]
        body = nn.Sequential(build_body([opts_r.blocks[i] for i in combo], members, probes))
        scores[combo] = naswot(body, batches)
        trace.append((time.perf_counter() - t0, scores[combo]))
    random_s = time.perf_counter() - t0

    within = [s for elapsed, s in trace if elapsed <= ilp_total_s]
    ilp_keys = {tuple(opts.blocks[i].key for i in a.blocks) for a in assemblies}
    valid_keys = {tuple(opts_r.blocks[i].key for i in c) for c in valid}
    surrogates = sorted((surrogate(opts_r, c) for c in valid), reverse=True)
    exhaustive = len(order) == len(valid)
    best_random = max(s for _, s in trace)
    match = next(((i + 1, e) for i, (e, s) in enumerate(trace) if s >= ilp_best.naswot - 1e-9), None)
    result = {
        "budget": str(config.budget),
        "valid_assemblies": len(valid),
        "ilp": {
            "candidates": len(assemblies),
            "solver": stats.to_dict(),
            "ilp_s": ilp_s,
            "seconds": ilp_total_s,
            "best_naswot": ilp_best.naswot,
            "best_blocks": [b.key for b in ilp_best.blocks],
            "best_macs": ilp_best.assembly.macs,
            "best_params": ilp_best.assembly.params,
            "naswot": [c.naswot for c in ranked],
            "all_valid": ilp_keys <= valid_keys,
            # the ILP's top surrogate equals the best surrogate of any valid assembly (enumeration check)
            "optimum_verified": abs(assemblies[0].surrogate - surrogates[0]) < 1e-9,
        },
        "random": {
            "enumerate_s": enumerate_s,
            "at_ilp_time": {
                "evaluated": len(within),
                "best_naswot": max(within) if within else None,
            },
            "full": {
                "evaluated": len(trace),
                "seconds": random_s,
                "best_naswot": best_random,
                "exhaustive": exhaustive,
            },
            # the first random candidate whose NASWOT reaches the ILP's pick: (candidates evaluated, seconds)
            "reaches_ilp_best": None if match is None else {"evaluated": match[0], "seconds": match[1]},
            "trace": [[round(e, 3), s] for e, s in trace],
        },
    }
    if exhaustive:  # every valid assembly scored: where does the ILP's pick rank among all of them?
        result["ilp"]["rank_among_all"] = 1 + sum(s > ilp_best.naswot + 1e-9 for s in scores.values())
    log(
        f"search: random {len(within)} candidates within the ILP's time (best {result['random']['at_ilp_time']}), "
        f"{len(trace)} in {random_s:.1f} s (best {best_random:.2f})"
    )
    return result


# ----------------------------------------------------------------------------- 4-5: tuned accuracy


def _tuned(net: nn.Module, analysis: ZooAnalysis, config: AssembleConfig) -> tuple[float, float]:
    """(linear-probe accuracy, accuracy after ``config.tune`` for ``config.epochs``) on the test split."""
    before = evaluate(net, analysis.test)
    with _quiet():
        tune(net, analysis.train, config)
    return before, evaluate(net, analysis.test)


def _net_costs(net: nn.Module, analysis: ZooAnalysis) -> tuple[int, int]:
    return count_params(net), model_macs(net, tuple(analysis.train.input_shape))


def bench_kendall(analysis: ZooAnalysis, config: AssembleConfig, log: Log) -> dict[str, Any]:
    """NASWOT and surrogate vs frozen-tuned accuracy of the ILP top ``config.top`` under ``config.budget``."""
    members = analysis.members_by_name
    opts, assemblies, _ = solve(analysis, config)
    ranked = rank_candidates(analysis, opts, assemblies, config)
    probes = ProbeActivations(members, analysis.probe)
    rows = []
    for c in ranked:
        t = time.perf_counter()
        train = analysis.train
        net = build_assembly(c.blocks, members, probes, train.x, train.y, train.num_classes)
        before, after = _tuned(net, analysis, config)
        params, macs = _net_costs(net, analysis)
        rows.append(
            {
                "blocks": [b.key for b in c.blocks],
                "naswot": c.naswot,
                "surrogate": c.assembly.surrogate,
                "params": params,
                "macs": macs,
                "accuracy_probe": before,
                "accuracy": after,
                "seconds": time.perf_counter() - t,
            }
        )
        log(f"tau: {' → '.join(rows[-1]['blocks'])}: NASWOT {c.naswot:.1f}, acc {before:.3f} → {after:.3f}")
    acc = [r["accuracy"] for r in rows]
    taus = {}
    for key in ("naswot", "surrogate", "accuracy_probe"):
        tau = kendalltau([r[key] for r in rows], acc)
        taus[key] = {"tau": float(tau.statistic), "p": float(tau.pvalue)}
    return {"budget": str(config.budget), "epochs": config.epochs, "tune": config.tune, "rows": rows, "tau": taus}


def _protocol(net: nn.Module, analysis: ZooAnalysis, config: AssembleConfig, full: bool) -> dict[str, float]:
    """Linear-probe and ``config.tune``-tuned accuracy of ``net`` (in place); with ``full`` also the accuracy
    after full tuning for the same epochs, on a copy of the untuned net."""
    untuned = copy.deepcopy(net) if full else None
    before, after = _tuned(net, analysis, config)
    out = {"probe": before, "tuned": after}
    if untuned is not None:
        out["full"] = _tuned(untuned, analysis, dataclasses.replace(config, tune="full"))[1]
    return out


def bench_budgets(
    analysis: ZooAnalysis, config: AssembleConfig, budgets: Sequence[Budget], full: bool, log: Log
) -> dict:
    """Per budget, the chosen assembly vs every zoo model that fits it (reported and same-protocol accuracy).

    ``full``: every network is also fully tuned (all weights) for the same epochs, from the same start.
    """
    members = analysis.members_by_name
    probes = ProbeActivations(members, analysis.probe)
    train = analysis.train
    singles = []
    for index, m in enumerate(analysis.members):
        bounds = analysis.partition.boundaries[index]
        blocks = [ChosenBlock(m.name, s, bounds[s], bounds[s + 1]) for s in range(analysis.partition.k)]
        net = build_assembly(blocks, members, probes, train.x, train.y, train.num_classes)
        acc = _protocol(net, analysis, config, full)
        params, macs = _net_costs(net, analysis)
        entry = get_entry(m.name)
        singles.append(
            {
                "model": m.name,
                "classes": len(entry.classes),
                "params": entry.params,
                "macs": entry.macs,
                "reported_accuracy": entry.test_accuracy,
                "protocol_params": params,
                "protocol_macs": macs,
                "protocol_probe_accuracy": acc["probe"],
                "protocol_accuracy": acc["tuned"],
                "full_tuning_accuracy": acc.get("full"),
            }
        )
        log(f"budgets: {m.name} body + new head: {acc} (reported {entry.test_accuracy})")
    rows = []
    for budget in budgets:
        cfg = dataclasses.replace(config, budget=budget)
        opts, assemblies, _ = solve(analysis, cfg)
        best = rank_candidates(analysis, opts, assemblies, cfg)[0]
        net = build_assembly(best.blocks, members, probes, train.x, train.y, train.num_classes)
        acc = _protocol(net, analysis, cfg, full)
        params, macs = _net_costs(net, analysis)
        fitting = [s["model"] for s in singles if _fits(budget, s["params"], s["macs"])]
        rows.append(
            {
                "budget": str(budget),
                "assembly": {
                    "blocks": [b.key for b in best.blocks],
                    "naswot": best.naswot,
                    "surrogate": best.assembly.surrogate,
                    "params": params,
                    "macs": macs,
                    "accuracy_probe": acc["probe"],
                    "accuracy": acc["tuned"],
                    "full_tuning_accuracy": acc.get("full"),
                },
                "fitting_models": fitting,
            }
        )
        log(f"budgets: {budget}: {' → '.join(b.key for b in best.blocks)}: {acc}; fitting zoo models {fitting}")
    return {"epochs": config.epochs, "tune": config.tune, "singles": singles, "budgets": rows}


def _fits(budget: Budget, params: float, macs: float) -> bool:
    return all(
        value <= bound * (1 + BUDGET_TOLERANCE)
        for value, bound in ((params, budget.params), (macs, budget.macs))
        if bound is not None
    )


# ----------------------------------------------------------------------------- tables and plot


def _s(value: float | str | None, digits: int = 2) -> str:
    if isinstance(value, str):  # a non-finite float read back from the JSON
        return value
    return "-" if value is None else f"{value:.{digits}f}"


def _n(value: float | None) -> str:
    if value is None:
        return "-"
    scale, suffix = next(((s, x) for s, x in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(value) >= s), (1.0, ""))
    return f"{value / scale:.3g}{suffix}"


def _left(index: int, column: str) -> bool:
    """Text columns are left-aligned, numbers right-aligned."""
    return index == 0 or column in ("method", "blocks", "model", "note")


class Output:
    """Where ``render`` writes: rich tables on a console, or Markdown (``--render-only --markdown``, for the docs)."""

    def __init__(self, console: Console, markdown: bool = False):
        self.console = console
        self.markdown = markdown

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.markdown:
            lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |"]
            lines.append("|" + "|".join("---" if _left(i, c) else "--:" for i, c in enumerate(columns)) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            self.console.print("\n".join(lines) + "\n", markup=False, highlight=False, soft_wrap=True)
            return
        table = Table(title=title, title_justify="left")
        for i, column in enumerate(columns):
            table.add_column(column, justify="left" if _left(i, column) else "right")
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    def line(self, text: str) -> None:
        self.console.print(text + ("\n" if self.markdown else ""), markup=False, highlight=False, soft_wrap=True)


def render(out: Output, result: dict) -> None:
    """Every table of ``result`` (parts that were run), in order."""
    setup = result["setup"]
    if result.get("scaling"):
        out.table(
            f"1. solver scaling: synthetic zoos, {setup['positions']} cut points/model, K=4, eps=0.2, "
            f"R={setup['restarts']}, ILP top-{setup['top']}, medium budget (target: {TARGET_MODELS} models "
            f"< {SCALING_TARGET_S:g} s)",
            ["models", "zoo blocks", "relaxed eps", "partition J", "partition s", "ILP vars", "ILP s", "total s"],
            [
                [
                    str(r["models"]),
                    str(r["blocks"]),
                    str(r["relaxed_eps_models"]),
                    _s(r["partition_objective"]),
                    _s(r["partition_s"]),
                    str(r["ilp_variables"]),
                    _s(r["ilp_s"]),
                    _s(r["total_s"]),
                ]
                for r in result["scaling"]
            ],
        )
    if result.get("dp_vs_swap"):
        out.table(
            "2. partition step: exact DP vs KL-style swaps (same seeds)",
            [
                "models",
                "method",
                "restarts",
                "objective J",
                "gap to best",
                "mean restart J",
                "restarts ≥ 99% of J",
                "seconds",
            ],
            [
                [
                    str(r["models"]),
                    r["method"],
                    str(r["restarts"]),
                    _s(r["objective"], 4),
                    _s(r["gap_to_best"], 4),
                    _s(r["mean_restart_objective"], 3),
                    str(r["restarts_within_1pct"]),
                    _s(r["seconds"]),
                ]
                for r in result["dp_vs_swap"]
            ],
        )
    for search in result.get("search") or []:
        ilp, rnd = search["ilp"], search["random"]
        rank = f", rank {ilp['rank_among_all']} of {search['valid_assemblies']}" if "rank_among_all" in ilp else ""
        out.table(
            f"3. demo zoo, budget {search['budget']}: {search['valid_assemblies']} valid assemblies; "
            f"ILP optimum verified by enumeration: {ilp['optimum_verified']}",
            ["search", "candidates", "seconds", "best NASWOT", "note"],
            [
                [
                    "ILP top-M + NASWOT re-rank",
                    str(ilp["candidates"]),
                    _s(ilp["seconds"]),
                    _s(ilp["best_naswot"]),
                    f"ILP {ilp['ilp_s']:.2f} s{rank}",
                ],
                [
                    "random, within ILP's time",
                    str(rnd["at_ilp_time"]["evaluated"]),
                    _s(ilp["seconds"]),
                    _s(rnd["at_ilp_time"]["best_naswot"]),
                    "uniform over valid, no replacement",
                ],
                [
                    "random, until it matches the ILP's pick",
                    "-" if rnd.get("reaches_ilp_best") is None else str(rnd["reaches_ilp_best"]["evaluated"]),
                    "-" if rnd.get("reaches_ilp_best") is None else _s(rnd["reaches_ilp_best"]["seconds"]),
                    "never" if rnd.get("reaches_ilp_best") is None else f"≥ {ilp['best_naswot']:.2f}",
                    "",
                ],
                [
                    "random, all candidates",
                    str(rnd["full"]["evaluated"]),
                    _s(rnd["full"]["seconds"]),
                    _s(rnd["full"]["best_naswot"]),
                    "exhaustive" if rnd["full"]["exhaustive"] else "",
                ],
            ],
        )
        out.line(f"   ILP pick: {' → '.join(ilp['best_blocks'])}")
    kendall = result.get("kendall")
    if kendall:
        out.table(
            f"4. proxies vs accuracy: ILP top-{len(kendall['rows'])} under {kendall['budget']}, "
            f"{kendall['tune']} tuning {kendall['epochs']} epochs, mnist5k test",
            ["#", "blocks", "params", "MACs", "surrogate", "NASWOT", "probe acc", "tuned acc"],
            [
                [
                    str(i + 1),
                    " → ".join(r["blocks"]),
                    _n(r["params"]),
                    _n(r["macs"]),
                    _s(r["surrogate"], 3),
                    _s(r["naswot"]),
                    _s(r["accuracy_probe"], 3),
                    _s(r["accuracy"], 3),
                ]
                for i, r in enumerate(kendall["rows"])
            ],
        )
        out.line(
            "   Kendall τ vs tuned accuracy: "
            + ", ".join(f"{k} τ={v['tau']:.3f} (p={v['p']:.3f})" for k, v in kendall["tau"].items())
        )
    budgets = result.get("budgets")
    if budgets:
        singles = {s["model"]: s for s in budgets["singles"]}
        out.table(
            "5a. demo zoo models (reported: trained on their own classes; protocol: body + new linear-probe "
            f"head, {budgets['tune']} tuning {budgets['epochs']} epochs, 10 classes; full-tuned: all weights, same "
            "epochs)",
            ["model", "classes", "params", "MACs", "reported acc", "probe acc", "protocol acc", "full-tuned acc"],
            [
                [
                    s["model"],
                    str(s["classes"]),
                    _n(s["params"]),
                    _n(s["macs"]),
                    _s(s["reported_accuracy"], 3),
                    _s(s["protocol_probe_accuracy"], 3),
                    _s(s["protocol_accuracy"], 3),
                    _s(s.get("full_tuning_accuracy"), 3),
                ]
                for s in budgets["singles"]
            ],
        )
        rows = []
        for b in budgets["budgets"]:
            a = b["assembly"]
            fit = [singles[m] for m in b["fitting_models"]]
            ten_class = [s for s in fit if s["classes"] == 10]
            best_reported = max(ten_class, key=lambda s: s["reported_accuracy"], default=None)
            best_protocol = max(fit, key=lambda s: s["protocol_accuracy"], default=None)
            rows.append(
                [
                    b["budget"],
                    "assembly: " + " → ".join(a["blocks"]),
                    _n(a["params"]),
                    _n(a["macs"]),
                    _s(a["accuracy_probe"], 3),
                    _s(a["accuracy"], 3),
                    _s(a.get("full_tuning_accuracy"), 3),
                    "-",
                ]
            )
            for label, s in (
                ("best single by reported acc (10-class)", best_reported),
                ("best single by protocol acc", best_protocol),
            ):
                if s is not None:
                    rows.append(
                        [
                            "",
                            f"{label}: {s['model']}",
                            _n(s["params"]),
                            _n(s["macs"]),
                            _s(s["protocol_probe_accuracy"], 3),
                            _s(s["protocol_accuracy"], 3),
                            _s(s.get("full_tuning_accuracy"), 3),
                            _s(s["reported_accuracy"], 3),
                        ]
                    )
        out.table(
            "5b. assembled vs best single zoo model within the budget (zoo models' own params/MACs; same "
            "protocol, reported accuracy for reference)",
            ["budget", "model", "params", "MACs", "probe acc", "protocol acc", "full-tuned acc", "reported acc"],
            rows,
        )


def plot(result: dict, path: Path) -> None:
    """Solver seconds vs zoo size (left) and NASWOT vs tuned accuracy with Kendall τ (right); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    scaling = result.get("scaling") or []
    if scaling:
        n = [r["models"] for r in scaling]
        for key, label, marker in (
            ("partition_s", "partition (dp)", "o"),
            ("ilp_s", "ILP top-20", "s"),
            ("total_s", "total", "D"),
        ):
            left.plot(n, [r[key] for r in scaling], marker=marker, label=label)
        swap = [r for r in result.get("dp_vs_swap") or [] if r["method"] == "swap"]
        if swap:
            left.plot([r["models"] for r in swap], [r["seconds"] for r in swap], "x:", label="partition (swap)")
        left.axhline(SCALING_TARGET_S, color="k", ls="--", lw=0.8, label=f"target at {TARGET_MODELS} models")
        left.set(xlabel="models in the zoo", ylabel="seconds (2-core CPU)", title="DeRy solver time vs zoo size")
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
    kendall = result.get("kendall")
    if kendall:
        rows = [r for r in kendall["rows"] if math.isfinite(r["naswot"])]
        right.scatter([r["naswot"] for r in rows], [r["accuracy"] for r in rows], label="frozen-tuned")
        right.scatter(
            [r["naswot"] for r in rows],
            [r["accuracy_probe"] for r in rows],
            marker="x",
            alpha=0.6,
            label="linear probe (untuned)",
        )
        tau = kendall["tau"]["naswot"]
        right.set(
            xlabel="NASWOT (mean of 5 batches)",
            ylabel="mnist5k test accuracy",
            title=f"ILP top-{len(kendall['rows'])}: Kendall τ = {tau['tau']:.2f} (p = {tau['p']:.2f})",
        )
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke version: sizes 5,30, 40 random candidates, τ over 10, 1 epoch"
    )
    parser.add_argument("--sizes", help="synthetic zoo sizes (default 5,10,20,30,50)")
    parser.add_argument("--swap-sizes", help="zoo sizes for dp vs swap (default 10,30)")
    parser.add_argument("--restarts", type=int, default=200, help="partition restarts (synthetic zoos and demo)")
    parser.add_argument("--top", type=int, default=20, help="ILP top-M (scaling and search)")
    parser.add_argument(
        "--search-budgets", nargs="+", help="budgets of ILP vs random search (default flops=2M flops=4M)"
    )
    parser.add_argument("--random-candidates", type=int, help="random search size (default 500)")
    parser.add_argument("--tau-budget", default="flops=100M", help="loose budget of the Kendall τ candidates")
    parser.add_argument("--tau-top", type=int, help="assemblies tuned for Kendall τ (default 20)")
    parser.add_argument("--budgets", nargs="+", help="budgets of assembled vs single (default flops=1M flops=4M)")
    parser.add_argument("--epochs", type=int, help="tuning epochs (default 2)")
    parser.add_argument("--tune", default="frozen", choices=("frozen", "full"), help="tuning mode (parts 4-5)")
    parser.add_argument(
        "--full-tuning",
        action=argparse.BooleanOptionalAction,
        help="part 5: also fully tune every network for the same epochs (default: on, off with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: scaling,swap,search,tau,budgets")
    parser.add_argument("--out", type=Path, default=RESULTS / "assemble.json", help="JSON results path")
    parser.add_argument("--render-only", action="store_true", help="re-print tables and redraw the plot from --out")
    parser.add_argument("--markdown", action="store_true", help="with --render-only: Markdown tables, no plot")
    args = parser.parse_args(argv)
    q = args.quick
    args.sizes = [int(s) for s in (args.sizes or ("5,30" if q else "5,10,20,30,50")).split(",")]
    args.swap_sizes = [int(s) for s in (args.swap_sizes or ("10" if q else "10,30")).split(",")]
    args.random_candidates = args.random_candidates or (40 if q else 500)
    args.tau_top = args.tau_top or (10 if q else 20)
    args.budgets = [Budget.parse(b) for b in (args.budgets or ["flops=1M", "flops=4M"])]
    args.search_budgets = [Budget.parse(b) for b in (args.search_budgets or ["flops=2M", "flops=4M"])]
    args.epochs = args.epochs or (1 if q else 2)
    args.full_tuning = not q if args.full_tuning is None else args.full_tuning
    args.skip = {s for s in args.skip.split(",") if s}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.render_only:
        result = json.loads(args.out.read_text())
        render(Output(console, args.markdown), result)
        if not args.markdown:
            plot(result, args.out.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    log_console = Console(stderr=True, width=200)

    def log(text: str) -> None:
        log_console.log(text)

    started = time.perf_counter()
    result: dict[str, Any] = {}
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if "scaling" not in args.skip:
        result["scaling"], zoos = bench_scaling(args.sizes, args.restarts, args.top, args.seed, log)
    else:
        zoos = {}
    timings["scaling_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if "swap" not in args.skip:
        result["dp_vs_swap"] = bench_dp_vs_swap(zoos, args.swap_sizes, args.restarts, args.seed, log)
    timings["dp_vs_swap_s"] = time.perf_counter() - t

    config = AssembleConfig(
        budget=args.search_budgets[0],
        zoo="demo",
        data="mnist5k",
        restarts=args.restarts,
        top=args.top,
        epochs=args.epochs,
        tune=args.tune,
        seed=args.seed,
    )
    analysis = None
    if {"search", "tau", "budgets"} - args.skip:
        t = time.perf_counter()
        with _quiet():
            analysis = analyse_zoo(config)
        timings["demo_analysis_s"] = time.perf_counter() - t
        log(f"demo zoo analysed in {timings['demo_analysis_s']:.1f} s (similarity cached on disk after the first run)")
    if analysis is not None and "search" not in args.skip:
        t = time.perf_counter()
        result["search"] = [
            bench_search(analysis, dataclasses.replace(config, budget=b), args.random_candidates, args.seed, log)
            for b in args.search_budgets
        ]
        timings["search_s"] = time.perf_counter() - t
    if analysis is not None and "tau" not in args.skip:
        t = time.perf_counter()
        cfg = dataclasses.replace(config, budget=Budget.parse(args.tau_budget), top=args.tau_top)
        result["kendall"] = bench_kendall(analysis, cfg, log)
        timings["kendall_s"] = time.perf_counter() - t
    if analysis is not None and "budgets" not in args.skip:
        t = time.perf_counter()
        result["budgets"] = bench_budgets(analysis, config, args.budgets, args.full_tuning, log)
        timings["budgets_s"] = time.perf_counter() - t

    result["setup"] = {
        "positions": 40,
        "k": 4,
        "eps": 0.2,
        "restarts": args.restarts,
        "top": args.top,
        "epochs": args.epochs,
        "tune": args.tune,
        "threads": args.threads,
        "seed": args.seed,
        "quick": args.quick,
        "torch": torch.__version__,
        "pulp": pulp.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "timings": timings,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(args.out, _finite(result))
    plot(result, args.out.with_suffix(".png"))
    render(Output(console), result)
    console.print(f"total {result['setup']['seconds']} s; wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats (a singular NASWOT kernel gives -inf) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


if __name__ == "__main__":
    sys.exit(main())
