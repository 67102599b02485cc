"""DeRy benchmark: solver scaling, DP vs swap, ILP + re-rank vs random search, proxies, assembled vs baselines.

Usage::

    python bench/assemble.py                # full run (~30 min on 2 cores; see docs/bench_assemble.md)
    python bench/assemble.py --quick        # smoke version (a few minutes): fewer sizes, budgets, seeds; 1 epoch
    python bench/assemble.py --skip scaling,swap --budgets flops=2M --seeds 0 --epochs 3
    python bench/assemble.py --render-only  # re-print the tables and redraw the plot from the JSON

Six measurements, one run (parts 3-6 on the pipeline's default target: ``digits`` at the demo zoo's 28×28, split
into fit / val (held out of the training data) / test; every selection reads val, test is only reported):

1. **solver scaling** on synthetic zoos (``synthetic_zoo``): N models × 40 cut points, each position a noisy
   unit vector drifting through K hidden stage directions along a per-model warped depth, C = clip(Gram, 0, 1);
   synthetic params/MACs per segment and per stitch. Times ``partition_zoo`` (dp, K=4, eps=0.2, R=200) and
   ``solve_assemblies`` (top 20) under a medium budget (the median zoo model's params and MACs).
2. **dp vs swap** partition step on the same zoos: objective and seconds at equal restarts, and swap with the
   restarts that fit in dp's wall time.
3. **ILP + re-rank vs random search** on the demo zoo: the pipeline's ``member_probes`` (the ILP's quality) +
   ``solve`` + ``rank_candidates`` (held-out linear-probe accuracy, the default proxy; whole zoo models added)
   against uniform sampling (without replacement) of the assemblies valid for the same partition and budget
   (one block per set and per stage, joinable, ``fits``; enumerated exhaustively), each built and scored exactly
   as ``rank_candidates`` scores an ILP candidate; best proxy within the ILP side's wall time, and after all
   ``--random-candidates``; for each of ``--search-budgets``.
4. **proxies vs accuracy**: every candidate ``rank_candidates`` returns for the ILP top ``--tau-top`` under a
   loose budget (``--tau-budget``): its surrogate, held-out probe accuracy and NASWOT (``naswot`` on the built
   body, the pipeline's ``_naswot_batches``) against its test accuracy after full (and frozen) tuning for the
   same epochs as the pipeline; Kendall τ (SciPy) of each proxy against the tuned accuracy.
5. **assembly vs baselines** (the headline): ``assemble(AssembleConfig(budget, tune=mode, seed))`` end to end for
   every ``--budgets`` × ``--modes`` × ``--seeds``: the chosen network's test accuracy against (a) the best single
   zoo model that fits and (b) a from-scratch twin, both tuned the same way (``report["baselines"]``); mean ± std
   over seeds, how many picks are whole zoo models, the pipeline's own Kendall τ, time per stage; and the targets:
   under full tuning, assembly ≥ (a) on average at ≥ 2 of the 3 flops budgets, and assembly ≥ (b) at every budget.
6. **defaults ablation** at ``--ablation-budget`` (full tuning, every seed): the default config (distinct sets,
   ``pool="auto"``) against ``distinct_sets=False`` and ``pool="mean"``: test accuracy, pickable blocks per
   equivalence set, whole-model picks.

Prints rich tables, writes ``bench/results/assemble.json`` and ``bench/results/assemble.png`` (solver time vs
zoo size; probe accuracy vs tuned accuracy; part 5's accuracies per budget, full and frozen) atomically. Torch
runs on ``--threads`` (default 1) intra-op threads; every pipeline run shares one temporary similarity cache.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pulp
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import kendalltau

from zoocompiler.core.atomic import atomic_path, write_json_atomic
from zoocompiler.core.budget import Budget
from zoocompiler.passes.rewrite.compose import ProbeActivations, build_assembly
from zoocompiler.pipelines.assemble.naswot import naswot
from zoocompiler.pipelines.assemble.pipeline import (
    AssembleConfig,
    ZooAnalysis,
    _naswot_batches,
    _score_candidate,
    analyse_zoo,
    assemble,
    member_probes,
    rank_candidates,
    solve,
    tune,
)
from zoocompiler.pipelines.assemble.problem import AssemblyOptions
from zoocompiler.solvers.assembly_ilp import BlockOption, JoinCost, fits, solve_assemblies
from zoocompiler.solvers.partition import ModelPositions, Partition, partition_zoo
from zoocompiler.training import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
SCALING_TARGET_S = 10.0  # 30 models, partition + ILP top-20
TARGET_MODELS = 30
STAGES = ("analysis", "probe_zoo", "ilp", "rerank", "tune", "baselines", "export")  # assemble()'s timings
PARTS = {"1": "scaling", "2": "swap", "3": "search", "4": "tau", "5": "budgets", "6": "ablation"}
ABLATION = (("default", {}), ("distinct_sets=False", {"distinct_sets": False}), ("pool=mean", {"pool": "mean"}))
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


# ----------------------------------------------------------------------------- 3: ILP + re-rank vs random search


def _quiet() -> contextlib.AbstractContextManager:
    """Silence tqdm bars and library chatter on stderr (the bench logs its own progress)."""
    return contextlib.redirect_stderr(io.StringIO())


def valid_assemblies(opts: AssemblyOptions, budget: Budget) -> list[tuple[int, ...]]:
    """Every assembly the ILP may return: one block per stage and per set, joinable pairs, within the budget."""
    if budget.latency_ms is not None:
        raise ValueError("the random-search baseline enumerates params/MACs budgets only")
    k = max(o.stage for o in opts.options) + 1
    by_stage = [[i for i, o in enumerate(opts.options) if o.stage == s] for s in range(k)]
    forbidden = set(opts.forbidden)
    out = []
    for combo in itertools.product(*by_stage):
        if len({opts.options[i].set for i in combo}) != k:
            continue
        if any(p in forbidden or p not in opts.joins for p in zip(combo, combo[1:])):
            continue
        if fits(opts.assembly(combo), budget):
            out.append(combo)
    return out


def bench_search(analysis: ZooAnalysis, config: AssembleConfig, max_candidates: int, log: Log) -> dict[str, Any]:
    """The pipeline's probe + ILP top-M + re-rank against uniform random search over the valid assemblies.

    Both sides start with cold probe-activation caches; the random side is timed from its own start (the
    enumeration included) and scores each assembly as ``rank_candidates`` scores an ILP candidate."""
    members = analysis.members_by_name
    t = time.perf_counter()
    probes = ProbeActivations(members, analysis.probe)
    quality = member_probes(analysis, probes)
    probe_zoo_s = time.perf_counter() - t
    opts, assemblies, stats = solve(analysis, config, quality=quality)
    ilp_s = time.perf_counter() - t - probe_zoo_s
    ranked = rank_candidates(analysis, opts, assemblies, config, probes, quality=quality)
    ilp_total_s = time.perf_counter() - t
    best = ranked[0]
    log(f"search {config.budget}: zoo probes {probe_zoo_s:.2f} s + ILP top-{len(assemblies)} {ilp_s:.2f} s + "
        f"re-rank of {len(ranked)} = {ilp_total_s:.2f} s, best probe {best.probe:.3f} ({best.source})")

    t0 = time.perf_counter()
    valid = valid_assemblies(opts, config.budget)
    enumerate_s = time.perf_counter() - t0
    order = np.random.default_rng(config.seed).permutation(len(valid))[:max_candidates]
    cold = ProbeActivations(members, analysis.probe)
    trace: list[tuple[float, float]] = []
    scores: dict[tuple[int, ...], float] = {}
    for idx in order:
        cand = _score_candidate(opts.assembly(valid[idx]), opts=opts, members=members, probes=cold, batches=None,
                                task=analysis.task)
        scores[valid[idx]] = cand.probe
        trace.append((time.perf_counter() - t0, cand.probe))
    random_s = time.perf_counter() - t0

    within = [s for elapsed, s in trace if elapsed <= ilp_total_s]
    exhaustive = len(order) == len(valid)
    best_random = max((s for _, s in trace), default=None)
    match = next(((i + 1, e) for i, (e, s) in enumerate(trace) if s >= best.probe - 1e-9), None)
    top_surrogate = max((opts.assembly(c).surrogate for c in valid), default=None)
    valid_set = set(valid)
    result = {
        "budget": str(config.budget),
        "valid_assemblies": len(valid),
        "ilp": {
            "candidates": len(ranked),
            "ilp_candidates": len(assemblies),
            "solver": stats.to_dict(),
            "probe_zoo_s": probe_zoo_s,
            "ilp_s": ilp_s,
            "seconds": ilp_total_s,
            "best_probe": best.probe,
            "best_source": best.source,
            "best_blocks": [b.key for b in best.blocks],
            "best_params": best.assembly.params,
            "best_macs": best.assembly.macs,
            "probes": [c.probe for c in ranked],
            "all_valid": all(a.blocks in valid_set for a in assemblies),
            # the ILP's top surrogate equals the best surrogate of any valid assembly (enumeration check)
            "optimum_verified": top_surrogate is not None and abs(assemblies[0].surrogate - top_surrogate) < 1e-9,
        },
        "random": {
            "enumerate_s": enumerate_s,
            "at_ilp_time": {"evaluated": len(within), "best_probe": max(within) if within else None},
            "full": {"evaluated": len(trace), "seconds": random_s, "best_probe": best_random,
                     "exhaustive": exhaustive},
            # the first random candidate whose probe accuracy reaches the ILP side's pick: (evaluated, seconds)
            "reaches_ilp_best": None if match is None else {"evaluated": match[0], "seconds": match[1]},
            "trace": [[round(e, 3), s] for e, s in trace],
        },
    }
    if exhaustive:  # every valid assembly scored: where does the ILP side's pick rank among all of them?
        result["ilp"]["rank_among_all"] = 1 + sum(s > best.probe + 1e-9 for s in scores.values())
    log(f"search {config.budget}: random {len(within)} candidates within the ILP's time "
        f"(best {result['random']['at_ilp_time']['best_probe']}), {len(trace)} of {len(valid)} valid in "
        f"{random_s:.1f} s (best {best_random})")
    return result


# ----------------------------------------------------------------------------- 4: proxies vs tuned accuracy


def _tau(x: Sequence[float], y: Sequence[float]) -> dict[str, float] | None:
    """SciPy's Kendall τ-b and its p-value; None where undefined (fewer than 2 items, a constant ranking)."""
    if len(x) < 2:
        return None
    res = kendalltau(x, y)
    if not (math.isfinite(res.statistic) and math.isfinite(res.pvalue)):
        return None
    return {"tau": float(res.statistic), "p": float(res.pvalue)}


def _tuned_accuracy(net, analysis: ZooAnalysis, config: AssembleConfig, mode: str) -> dict[str, float]:
    """Val and test accuracy of a copy of ``net`` after ``pipeline.tune`` in ``mode`` (no head kept back)."""
    net = copy.deepcopy(net)
    t = time.perf_counter()
    with _quiet():
        tune(net, analysis.task.fit, config, mode)
    return {"val": evaluate(net, analysis.task.val), "test": evaluate(net, analysis.task.test),
            "seconds": time.perf_counter() - t}


def bench_proxies(analysis: ZooAnalysis, config: AssembleConfig, limit: int | None, frozen: bool,
                  log: Log) -> dict[str, Any]:
    """Surrogate, probe accuracy and NASWOT of what ``rank_candidates`` returns (ILP top ``config.top`` plus the
    whole zoo models that fit, best probe first, the first ``limit``) vs test accuracy after tuning."""
    members = analysis.members_by_name
    task = analysis.task
    probes = ProbeActivations(members, analysis.probe)
    quality = member_probes(analysis, probes)
    opts, assemblies, _ = solve(analysis, config, quality=quality)
    ranked = rank_candidates(analysis, opts, assemblies, config, probes, quality=quality)[:limit]
    batches = _naswot_batches(analysis.train, config)
    modes = ("full", "frozen") if frozen else ("full",)
    rows = []
    for c in ranked:
        net = build_assembly(c.blocks, members, probes, task.fit.x, task.fit.y, task.num_classes)
        row = {
            "blocks": [b.key for b in c.blocks],
            "source": c.source,
            "params": c.assembly.params,
            "macs": c.assembly.macs,
            "surrogate": c.assembly.surrogate,
            "probe": c.probe,
            "naswot": naswot(net.body, batches),
            "test_ridge": evaluate(net, task.test),
        }
        for mode in modes:
            row[mode] = _tuned_accuracy(net, analysis, config, mode)
        rows.append(row)
        log(f"tau: {' → '.join(row['blocks'])}: probe {c.probe:.3f}, NASWOT {row['naswot']:.1f}, "
            + ", ".join(f"{m} {row[m]['test']:.3f}" for m in modes))
    taus = {mode: {key: _tau([r[key] for r in rows], [r[mode]["test"] for r in rows])
                   for key in ("surrogate", "probe", "naswot")} for mode in modes}
    return {"budget": str(config.budget), "top": config.top, "epochs": config.epochs, "lr": config.lr,
            "modes": list(modes), "rows": rows, "tau": taus}


# ----------------------------------------------------------------------------- 5-6: the pipeline end to end


def run_assemble(config: AssembleConfig, work: Path) -> dict[str, Any]:
    """``assemble(config)`` into a scratch directory (removed after), progress off; the measured fields."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="run_"))
    t = time.perf_counter()
    run = {"budget": str(config.budget), "tune": config.tune, "seed": config.seed, "epochs": config.epochs,
           "distinct_sets": config.distinct_sets, "pool": config.pool}
    try:
        with _quiet():
            report = assemble(config, out)
    except Exception as e:  # noqa: BLE001 - one failed run must not lose a long benchmark; it is shown in 5b
        return {**run, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seconds = time.perf_counter() - t
    base = report["baselines"] or {}
    single, scratch = base.get("single"), base.get("scratch")
    return {
        **run,
        "accuracy": report["accuracy"],
        "accuracy_before_tuning": report["accuracy_before_tuning"],
        "val_accuracy": report["val_accuracy"],
        "kept_head": report["kept_head"],
        "chosen_source": report["chosen_source"],
        "chosen": [f"{r['model']}[{r['positions'][0]}:{r['positions'][1]}]" for r in report["chosen"]],
        "params": report["params"],
        "macs": report["macs"],
        "kendall_tau": report["kendall_tau"],
        "tuned": [{k: t[k] for k in ("blocks", "source", "score", "val", "test", "kept")} for t in report["tuned"]],
        "single": None if single is None else {k: single[k] for k in (
            "model", "params", "macs", "probe", "test_before", "val", "test", "kept")},
        "scratch": None if scratch is None else {k: scratch[k] for k in (
            "params", "test_before", "val", "test", "kept")},
        "sets": report["sets"],
        "timings": report["timings"],
        "seconds": seconds,
    }


def _ok(runs: Sequence[dict]) -> list[dict]:
    """The runs that finished (a failed one has only its config, ``error`` and ``seconds``)."""
    return [r for r in runs if "error" not in r]


def _run_line(r: dict) -> str:
    if "error" in r:
        return f"{r['budget']} {r['tune']} seed {r['seed']}: FAILED: {r['error']}"
    single = r["single"]
    a = "-" if single is None else f"{single['test']:.3f} ({single['model']})"
    b = "-" if r["scratch"] is None else f"{r['scratch']['test']:.3f}"
    return (f"{r['budget']} {r['tune']} seed {r['seed']}: {r['accuracy']:.3f} ({r['chosen_source']}: "
            f"{' → '.join(r['chosen'])}); single {a}; scratch {b}; {r['seconds']:.0f} s")


def _same_run(r: dict, config: AssembleConfig) -> bool:
    return (r["budget"] == str(config.budget) and r["tune"] == config.tune and r["seed"] == config.seed
            and r["epochs"] == config.epochs and r["distinct_sets"] == config.distinct_sets
            and r["pool"] == config.pool)


def bench_budgets(base: AssembleConfig, budgets: Sequence[Budget], modes: Sequence[str], seeds: Sequence[int],
                  work: Path, log: Log) -> list[dict]:
    """Part 5: one ``assemble`` run per budget × tuning mode × seed."""
    runs = []
    for budget, mode, seed in itertools.product(budgets, modes, seeds):
        runs.append(run_assemble(replace(base, budget=budget, tune=mode, seed=seed), work))
        log("budgets: " + _run_line(runs[-1]))
    return runs


def bench_ablation(base: AssembleConfig, budget: Budget, seeds: Sequence[int], done: Sequence[dict], work: Path,
                   log: Log) -> list[dict]:
    """Part 6: the default config against each variant of ``ABLATION`` (full tuning); part 5's runs re-used."""
    runs = []
    for (name, change), seed in itertools.product(ABLATION, seeds):
        config = replace(base, budget=budget, tune="full", seed=seed, **change)
        run = next((r for r in _ok(done) if _same_run(r, config)), None)
        if run is None:
            run = run_assemble(config, work)
            log(f"ablation {name}: " + _run_line(run))
        runs.append({**run, "variant": name})
    return runs


# ----------------------------------------------------------------------------- summaries (also on --render-only)


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof 1; None for one value) of the values that are not None."""
    v = [x for x in values if x is not None]
    if not v:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(v), "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None}


def _margin(r: dict, base: str) -> float | None:
    return None if r[base] is None else r["accuracy"] - r[base]["test"]


def summarise_budgets(runs: Sequence[dict]) -> list[dict]:
    """Per budget × mode (run order): mean ± std over seeds of the assembly, (a), (b), the margins; picks; τ."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in _ok(runs):
        groups.setdefault((r["budget"], r["tune"]), []).append(r)
    out = []
    for (budget, mode), rs in groups.items():
        singles = sorted({r["single"]["model"] for r in rs if r["single"] is not None})
        out.append({
            "budget": budget,
            "tune": mode,
            "seeds": [r["seed"] for r in rs],
            "assembly": _stats([r["accuracy"] for r in rs]),
            "single": _stats([None if r["single"] is None else r["single"]["test"] for r in rs]),
            "single_models": singles,
            "scratch": _stats([None if r["scratch"] is None else r["scratch"]["test"] for r in rs]),
            "margin_single": _stats([_margin(r, "single") for r in rs]),
            "margin_scratch": _stats([_margin(r, "scratch") for r in rs]),
            "whole_picks": sum(r["chosen_source"] == "whole" for r in rs),
            "kendall_tau": _stats([r["kendall_tau"] for r in rs]),
            "params": _stats([r["params"] for r in rs]),
            "macs": _stats([r["macs"] for r in rs]),
            "seconds": _stats([r["seconds"] for r in rs]),
        })
    return out


def _flops_only(budget: str) -> bool:
    b = Budget.parse(budget)
    return b.macs is not None and b.params is None and b.latency_ms is None


def budget_targets(summary: Sequence[dict]) -> dict[str, Any]:
    """Issue 15's targets under full tuning, on means over seeds: assembly ≥ (a) at ≥ 2 of 3 flops budgets (at
    least two thirds of those where a single model fits), and assembly ≥ (b) at every budget."""
    full = [s for s in summary if s["tune"] == "full"]
    flops = [s for s in full if _flops_only(s["budget"]) and s["margin_single"]["mean"] is not None]
    wins = [s["budget"] for s in flops if s["margin_single"]["mean"] >= 0]
    needed = math.ceil(2 * len(flops) / 3)
    scratch = [s for s in full if s["margin_scratch"]["mean"] is not None]
    return {
        "single": {
            "met": bool(flops) and len(wins) >= needed, "wins": wins, "budgets": [s["budget"] for s in flops],
            "needed": needed, "no_single": [s["budget"] for s in full if _flops_only(s["budget"])
                                            and s["margin_single"]["mean"] is None],
            "margins": {s["budget"]: s["margin_single"]["mean"] for s in flops},
        },
        "scratch": {
            "met": bool(scratch) and all(s["margin_scratch"]["mean"] >= 0 for s in scratch),
            "budgets": [s["budget"] for s in scratch],
            "margins": {s["budget"]: s["margin_scratch"]["mean"] for s in scratch},
        },
    }


def stage_times(runs: Sequence[dict]) -> list[dict]:
    """Mean seconds per ``assemble`` stage: per tuning mode and over all runs."""
    rows = []
    runs = _ok(runs)
    modes = sorted({r["tune"] for r in runs})
    for label, rs in [(m, [r for r in runs if r["tune"] == m]) for m in modes] + [("all", list(runs))]:
        if rs and (label != "all" or len(modes) > 1):
            rows.append({"runs": label, "n": len(rs),
                         **{s: float(np.mean([r["timings"].get(f"{s}_s", 0.0) for r in rs])) for s in STAGES},
                         "total": float(np.mean([r["seconds"] for r in rs]))})
    return rows


def summarise_ablation(runs: Sequence[dict]) -> list[dict]:
    out = []
    for name, _ in ABLATION:
        rs = [r for r in _ok(runs) if r["variant"] == name]
        if not rs:
            continue
        sets = sorted({" ".join(f"{s['pickable']}/{s['blocks']}" for s in r["sets"]) for r in rs})
        out.append({
            "variant": name,
            "seeds": [r["seed"] for r in rs],
            "assembly": _stats([r["accuracy"] for r in rs]),
            "margin_single": _stats([_margin(r, "single") for r in rs]),
            "pickable": _stats([sum(s["pickable"] for s in r["sets"]) for r in rs]),
            "blocks": sum(s["blocks"] for s in rs[0]["sets"]),
            "sets": sets,
            "whole_picks": sum(r["chosen_source"] == "whole" for r in rs),
            "picks": sorted({" → ".join(r["chosen"]) for r in rs}),
        })
    return out


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
    return index == 0 or column in ("method", "blocks", "model", "note", "tune", "source", "(a) model", "picks",
                                    "pickable/blocks per set")


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
        _render_search(out, search)
    if result.get("tau"):
        _render_tau(out, result["tau"])
    if result.get("budgets"):
        _render_budgets(out, result["budgets"])
    if result.get("ablation"):
        _render_ablation(out, result["ablation"])


def _epochs(n: int | str) -> str:
    return f"{n} epoch{'' if str(n) == '1' else 's'}"


def _pm(stats: dict | None, digits: int = 3, sign: bool = False) -> str:
    """``mean ± std`` of a ``_stats`` dict ("-" without values, no ± for one value)."""
    if not stats or stats["mean"] is None:
        return "-"
    mean = f"{stats['mean']:+.{digits}f}" if sign else f"{stats['mean']:.{digits}f}"
    return mean if stats["std"] is None else f"{mean} ± {stats['std']:.{digits}f}"


def _render_search(out: Output, search: dict) -> None:
    ilp, rnd = search["ilp"], search["random"]
    rank = f", rank {ilp['rank_among_all']} of {search['valid_assemblies']}" if "rank_among_all" in ilp else ""
    reach = rnd.get("reaches_ilp_best")
    out.table(
        f"3. demo zoo on digits, budget {search['budget']}: {search['valid_assemblies']} valid assemblies; "
        f"ILP optimum verified by enumeration: {ilp['optimum_verified']}; proxy: held-out probe accuracy",
        ["search", "candidates", "seconds", "best probe acc", "note"],
        [
            ["zoo probes + ILP top-M + re-rank", str(ilp["candidates"]), _s(ilp["seconds"]),
             _s(ilp["best_probe"], 3),
             f"probes {ilp['probe_zoo_s']:.2f} s, ILP {ilp['ilp_s']:.2f} s, {ilp['ilp_candidates']} ILP + "
             f"{ilp['candidates'] - ilp['ilp_candidates']} whole{rank}"],
            ["random, within the ILP side's time", str(rnd["at_ilp_time"]["evaluated"]), _s(ilp["seconds"]),
             _s(rnd["at_ilp_time"]["best_probe"], 3), "uniform over valid, no replacement"],
            ["random, until it matches the ILP side's pick", "-" if reach is None else str(reach["evaluated"]),
             "-" if reach is None else _s(reach["seconds"]), "never" if reach is None else f"≥ {ilp['best_probe']:.3f}",
             ""],
            ["random, all candidates", str(rnd["full"]["evaluated"]), _s(rnd["full"]["seconds"]),
             _s(rnd["full"]["best_probe"], 3), "exhaustive" if rnd["full"]["exhaustive"] else ""],
        ],
    )
    out.line(f"   ILP side's pick ({ilp['best_source']}): {' → '.join(ilp['best_blocks'])}")


def _render_tau(out: Output, tau: dict) -> None:
    modes = tau["modes"]
    out.table(
        f"4. proxies vs accuracy: ILP top-{tau['top']} (+ whole zoo models) under {tau['budget']}, best probe first; "
        f"tuned {_epochs(tau['epochs'])} (lr {tau['lr']:g}), digits test",
        ["#", "blocks", "source", "params", "MACs", "surrogate", "probe acc", "NASWOT", "ridge test",
         *[f"{m} test" for m in modes]],
        [
            [str(i + 1), " → ".join(r["blocks"]), r["source"], _n(r["params"]), _n(r["macs"]),
             _s(r["surrogate"], 3), _s(r["probe"], 3), _s(r["naswot"]), _s(r["test_ridge"], 3),
             *[_s(r[m]["test"], 3) for m in modes]]
            for i, r in enumerate(tau["rows"])
        ],
    )
    for mode in modes:
        out.line(f"   Kendall τ vs {mode}-tuned test accuracy: " + ", ".join(
            f"{key} " + ("undefined" if v is None else f"τ={v['tau']:.3f} (p={v['p']:.3f})")
            for key, v in tau["tau"][mode].items()))


def _limited(train_size: int | None) -> str:
    return "" if train_size is None else f" limited to {train_size} training images"


def _render_budgets(out: Output, budgets: dict) -> None:
    runs = budgets["runs"]
    summary = summarise_budgets(runs)
    epochs = sorted({r["epochs"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    out.table(
        f"5. assembly vs (a) best single zoo model that fits and (b) from-scratch twin: assemble() on digits"
        f"{_limited(budgets.get('train_size'))}, "
        f"{_epochs('/'.join(map(str, epochs)))}, seeds {','.join(map(str, seeds))}; test accuracy, "
        "mean ± std over seeds",
        ["budget", "tune", "assembly", "(a) single", "(a) model", "(b) scratch", "assembly − (a)", "assembly − (b)",
         "whole picks", "mean τ", "params", "MACs"],
        [
            [s["budget"], s["tune"], _pm(s["assembly"]), _pm(s["single"]), ", ".join(s["single_models"]) or "none fits",
             _pm(s["scratch"]), _pm(s["margin_single"], sign=True), _pm(s["margin_scratch"], sign=True),
             f"{s['whole_picks']} of {len(s['seeds'])}", _s(s["kendall_tau"]["mean"]),
             _n(s["params"]["mean"]), _n(s["macs"]["mean"])]
            for s in summary
        ],
    )
    target = budget_targets(summary)
    a, b = target["single"], target["scratch"]
    margins_a = ", ".join(f"{k} {v:+.3f}" for k, v in a["margins"].items())
    margins_b = ", ".join(f"{k} {v:+.3f}" for k, v in b["margins"].items())
    no_single = f"; no single model fits at {', '.join(a['no_single'])}" if a["no_single"] else ""
    out.line(f"   target, full tuning: assembly ≥ (a) on average at ≥ {a['needed']} of {len(a['budgets'])} flops "
             f"budgets: {'MET' if a['met'] else 'MISSED'} ({len(a['wins'])} of {len(a['budgets'])}: "
             f"{margins_a or 'no full-tuning flops runs'}){no_single}")
    out.line(f"   target, full tuning: assembly ≥ (b) at every budget: {'MET' if b['met'] else 'MISSED'} "
             f"({margins_b or 'no full-tuning runs'})")
    out.table(
        "5b. every run: the pick and its baselines (test accuracy)",
        ["budget", "tune", "seed", "assembly", "source", "blocks", "(a) single", "(b) scratch", "τ", "seconds"],
        [
            [r["budget"], r["tune"], str(r["seed"]), "-", "FAILED", r["error"], "-", "-", "-", _s(r["seconds"], 0)]
            if "error" in r else
            [r["budget"], r["tune"], str(r["seed"]), _s(r["accuracy"], 3), r["chosen_source"], " → ".join(r["chosen"]),
             "-" if r["single"] is None else f"{r['single']['test']:.3f} {r['single']['model']}",
             "-" if r["scratch"] is None else _s(r["scratch"]["test"], 3), _s(r["kendall_tau"]), _s(r["seconds"], 0)]
            for r in runs
        ],
    )
    out.table(
        "5c. assemble() seconds per stage, mean over the runs (one torch thread)",
        ["runs", "n", *[f"{s} s" for s in STAGES], "total s"],
        [[t["runs"], str(t["n"]), *[_s(t[s], 1) for s in STAGES], _s(t["total"], 1)] for t in stage_times(runs)],
    )


def _render_ablation(out: Output, ablation: dict) -> None:
    rows = summarise_ablation(ablation["runs"])
    out.table(
        f"6. defaults ablation at {ablation['budget']}, full tuning, seeds "
        f"{','.join(map(str, ablation['seeds']))}: test accuracy, mean ± std over seeds",
        ["variant", "assembly", "assembly − (a)", "pickable blocks", "pickable/blocks per set", "whole picks",
         "picks"],
        [
            [r["variant"], _pm(r["assembly"]), _pm(r["margin_single"], sign=True),
             f"{_s(r['pickable']['mean'], 1)} of {r['blocks']}", "; ".join(r["sets"]),
             f"{r['whole_picks']} of {len(r['seeds'])}", " | ".join(r["picks"])]
            for r in rows
        ],
    )
    for r in ablation["runs"]:
        if "error" in r:
            out.line(f"   {r['variant']}: " + _run_line(r))
    default = next((r for r in rows if r["variant"] == "default"), None)
    for r in rows:
        if default is not None and r is not default and r["assembly"]["mean"] is not None:
            delta = r["assembly"]["mean"] - default["assembly"]["mean"]
            out.line(f"   {r['variant']} vs default: {delta:+.3f} test accuracy (mean over seeds)")


def plot(result: dict, path: Path) -> None:
    """Solver seconds vs zoo size; probe accuracy vs tuned accuracy (part 4); part 5's accuracies per budget under
    full and frozen tuning (mean ± std over seeds). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    left, right = axes[0]
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
    else:
        left.axis("off")
    tau = result.get("tau")
    if tau and tau["rows"]:
        rows = tau["rows"]
        for mode, marker in (("full", "o"), ("frozen", "^")):
            if mode in tau["modes"]:
                t = tau["tau"][mode]["probe"]
                label = f"{mode}-tuned (τ = {t['tau']:.2f})" if t else f"{mode}-tuned"
                right.scatter([r["probe"] for r in rows], [r[mode]["test"] for r in rows], marker=marker, label=label)
        right.scatter([r["probe"] for r in rows], [r["test_ridge"] for r in rows], marker="x", alpha=0.6,
                      label="ridge head (untuned)")
        right.set(xlabel="held-out linear-probe accuracy (the proxy)", ylabel="digits test accuracy",
                  title=f"part 4: {len(rows)} candidates under {tau['budget']}")
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    else:
        right.axis("off")
    summary = summarise_budgets(_ok(result["budgets"]["runs"])) if result.get("budgets") else []
    bars = (("assembly", "assembly"), ("single", "(a) best single"), ("scratch", "(b) from scratch"))
    low = min((s[k]["mean"] - (s[k]["std"] or 0.0) for s in summary for k, _ in bars if s[k]["mean"] is not None),
              default=0.0)
    for ax, mode in zip(axes[1], ("full", "frozen"), strict=True):
        rows = [s for s in summary if s["tune"] == mode]
        if not rows:
            ax.axis("off")
            continue
        x = np.arange(len(rows))
        for i, (key, label) in enumerate(bars):
            mean = np.array([np.nan if s[key]["mean"] is None else s[key]["mean"] for s in rows])
            std = np.array([0.0 if s[key]["std"] is None else s[key]["std"] for s in rows])
            ax.bar(x + (i - 1) * 0.27, mean, 0.27, yerr=std, capsize=3, label=label)
            for xi, m in zip(x + (i - 1) * 0.27, mean, strict=True):
                if np.isfinite(m):  # the mean, inside the top of its bar
                    ax.text(xi, m - 0.004, f"{m:.3f}", rotation=90, ha="center", va="top", fontsize=7, color="white")
        seeds = max(len(s["seeds"]) for s in rows)
        ax.set_xticks(x, [s["budget"] for s in rows])
        ax.set_ylim(max(0.0, low - 0.03), 1.0)  # both panels on one scale
        ax.set(ylabel="digits test accuracy", title=f"part 5: {mode} tuning, mean ± std over {seeds} seed(s)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def _budgets(values: Sequence[str]) -> list[Budget]:
    return [Budget.parse(v) for v in values]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke version: sizes 5,30; swap at 10; search at flops=2M over 20 random; τ over 5; "
                             "part 5 at flops=2M, seed 0; part 6 seed 0; 1 epoch")
    parser.add_argument("--sizes", help="synthetic zoo sizes (default 5,10,20,30,50)")
    parser.add_argument("--swap-sizes", help="zoo sizes for dp vs swap (default 10,30)")
    parser.add_argument("--restarts", type=int, default=200, help="partition restarts (synthetic zoos and demo)")
    parser.add_argument("--top", type=int, default=20, help="ILP top-M (scaling, search, parts 5-6)")
    parser.add_argument("--search-budgets", nargs="+", help="part 3 budgets (default flops=2M)")
    parser.add_argument("--random-candidates", type=int, help="part 3 random search size (default 200)")
    parser.add_argument("--tau-budget", default="flops=100M", help="part 4: loose budget of the candidates")
    parser.add_argument("--tau-top", type=int, help="part 4: ILP top-M (default 20, quick 5)")
    parser.add_argument("--tau-limit", type=int,
                        help="part 4: tune only the first N candidates by probe (default all; quick 5)")
    parser.add_argument("--tau-frozen", action=argparse.BooleanOptionalAction, default=True,
                        help="part 4: frozen-tune every candidate too (default on)")
    parser.add_argument("--budgets", nargs="+",
                        help="part 5 budgets (default flops=1M flops=2M flops=4M params=100k; quick flops=2M)")
    parser.add_argument("--modes", nargs="+", choices=("frozen", "full"), default=["frozen", "full"],
                        help="part 5 tuning modes")
    parser.add_argument("--seeds", help="parts 5-6 seeds (default 0,1,2; quick 0)")
    parser.add_argument("--ablation-budget", default="flops=2M", help="part 6 budget")
    parser.add_argument("--epochs", type=int, help="tuning epochs, parts 4-6 (default: the pipeline's, 5; quick 1)")
    parser.add_argument("--train-size", type=int,
                        help="parts 3-6: limit the task's training split to N samples (default: all of it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of parts 1-4")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: scaling,swap,search,tau,budgets,ablation (or 1-6)")
    parser.add_argument("--out", type=Path, default=RESULTS / "assemble.json",
                        help="JSON results path; the PNG goes next to it (same name, .png)")
    parser.add_argument("--render-only", action="store_true", help="re-print tables and redraw the plot from --out")
    parser.add_argument("--markdown", action="store_true", help="with --render-only: Markdown tables, no plot")
    args = parser.parse_args(argv)
    q = args.quick
    args.sizes = [int(s) for s in (args.sizes or ("5,30" if q else "5,10,20,30,50")).split(",")]
    args.swap_sizes = [int(s) for s in (args.swap_sizes or ("10" if q else "10,30")).split(",")]
    args.search_budgets = _budgets(args.search_budgets or ["flops=2M"])
    args.random_candidates = args.random_candidates or (20 if q else 200)
    args.tau_top = args.tau_top or (5 if q else 20)
    args.tau_limit = args.tau_limit or (5 if q else None)
    default_budgets = ["flops=2M"] if q else ["flops=1M", "flops=2M", "flops=4M", "params=100k"]
    args.budgets = _budgets(args.budgets or default_budgets)
    args.seeds = [int(s) for s in (args.seeds or ("0" if q else "0,1,2")).split(",")]
    args.ablation_budget = Budget.parse(args.ablation_budget)
    args.epochs = args.epochs or (1 if q else None)
    skip = {PARTS.get(s.strip(), s.strip()) for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS.values()):
        parser.error(f"unknown --skip part(s) {', '.join(sorted(skip - set(PARTS.values())))}; "
                     f"use {','.join(PARTS.values())} or 1-6")
    args.skip = skip
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

    @contextlib.contextmanager
    def timed(name: str):
        t = time.perf_counter()
        yield
        timings[f"{name}_s"] = time.perf_counter() - t

    zoos: dict = {}
    if "scaling" not in args.skip:
        with timed("scaling"):
            result["scaling"], zoos = bench_scaling(args.sizes, args.restarts, args.top, args.seed, log)
    if "swap" not in args.skip:
        with timed("dp_vs_swap"):
            result["dp_vs_swap"] = bench_dp_vs_swap(zoos, args.swap_sizes, args.restarts, args.seed, log)

    with tempfile.TemporaryDirectory(prefix="bench_assemble_") as tmp:
        work = Path(tmp)
        extra = {} if args.epochs is None else {"epochs": args.epochs}
        base = AssembleConfig(budget=args.search_budgets[0], restarts=args.restarts, top=args.top, seed=args.seed,
                              cache_dir=work / "cache", train_size=args.train_size, **extra)
        if {"search", "tau"} - args.skip:
            with timed("demo_analysis"), _quiet():
                analysis = analyse_zoo(base)
            log(f"demo zoo analysed in {timings['demo_analysis_s']:.1f} s "
                f"(task {base.data}: {analysis.task.sizes()})")
            if "search" not in args.skip:
                with timed("search"):
                    result["search"] = [bench_search(analysis, replace(base, budget=b), args.random_candidates, log)
                                        for b in args.search_budgets]
            if "tau" not in args.skip:
                with timed("tau"):
                    cfg = replace(base, budget=Budget.parse(args.tau_budget), top=args.tau_top)
                    result["tau"] = bench_proxies(analysis, cfg, args.tau_limit, args.tau_frozen, log)
        runs: list[dict] = []
        if "budgets" not in args.skip:
            with timed("budgets"):
                runs = bench_budgets(base, args.budgets, args.modes, args.seeds, work, log)
            summary = summarise_budgets(runs)
            result["budgets"] = {"runs": runs, "summary": summary, "targets": budget_targets(summary),
                                 "train_size": args.train_size,
                                 "stage_times": stage_times(runs)}
        if "ablation" not in args.skip:
            with timed("ablation"):
                ablation = bench_ablation(base, args.ablation_budget, args.seeds, runs, work, log)
            result["ablation"] = {"budget": str(args.ablation_budget), "seeds": args.seeds, "runs": ablation,
                                  "summary": summarise_ablation(ablation)}

    result["setup"] = {
        "positions": 40,
        "k": 4,
        "eps": 0.2,
        "restarts": args.restarts,
        "top": args.top,
        "data": base.data,
        "train_size": base.train_size,
        "epochs": base.epochs,
        "lr": base.lr,
        "threads": args.threads,
        "seed": args.seed,
        "seeds": args.seeds,
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
