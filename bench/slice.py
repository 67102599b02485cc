"""Model-slicing benchmark (paper 003, issues 5 and 19): accuracy per slice rate for slicing-trained (one column per
rate scheduler), conventionally trained-then-sliced and fixed-width models, training time on subnet views against
the masked full-width graph, and ONNX Runtime latency of every r-subnet with GroupNorm as exported before and after
issue 19, next to the BatchNorm original at the same width.

Usage::

    python bench/slice.py                   # full run (~18-25 min on 2 cores; see docs/bench_slice.md)
    python bench/slice.py --fixed-rates all # (c) at every rate 0.25..1 too (~+8 min)
    python bench/slice.py --quick           # smoke version (< 3 min): 2 epochs, rates 1/0.75/0.5/0.25
    python bench/slice.py --models vgg --epochs 5 --fixed-rates 0.5,1 --jobs 1
    python bench/slice.py --render-only     # re-print the tables and redraw the plot from the JSON
    python bench/slice.py --render-only --markdown  # the tables of docs/bench_slice.md

Two models, both with BatchNorm widths divisible by G = 16, built here and passed through
``zoocompiler.trace`` + ``make_sliceable(groups=16)`` (BatchNorm → GroupNorm): ``vgg`` =
``VGGClassifier((32, "M", 64, "M", 128, 128, "M"), 10, hidden=256)`` and ``resnet`` = timm
``ResNet(BasicBlock, (1, 1, 1, 1), stem_width=32, channels=(32, 64, 128, 256))``, 1×28×28 input (mnist5k).
Every network is trained from scratch (``reset_parameters`` after seeding, as ``build_sliceable(from_scratch=True)``)
with the same epochs, learning rate, batch size, weight decay and ±2 px shift augmentation:

(a) slicing-trained: ``train_sliceable`` over the valid rates ≥ lb (lb = 0.25, so every reported rate is trained)
    with each scheduler of ``--schedulers``: N(1, 1/3), the sandwich rule (1, lb and 2 random rates per batch), the
    sandwich rule with in-place distillation, progressive dynamic (r = 1 for 30 %, then N(1, 1/3)) and progressive
    static; all on subnet views. ``--extra-lb 0.375`` adds the paper's lb for N(1, 1/3) as a further column;
(b) conventionally trained, then sliced: the same sliceable model with lb = 1.0 (every batch at r = 1);
(c) fixed-width: the r-subnet architecture (``sm_init.slice(r).module`` of a fresh sliceable model, re-initialised)
    trained alone with ``zoocompiler.training.train``, at ``--fixed-rates`` (default the paper's 0.25..1 by 1/8).

Accuracy is measured on the materialised r-subnets (``evaluate_rates``). The training jobs are independent and
seeded (one torch thread each), so they run in ``--jobs`` worker processes with identical results. After every job
has finished (nothing else of ours running), each r-subnet of the slicing-trained (a) model is exported with
``export_onnx`` (parity-checked) and timed with ``measure_latency`` (ONNX Runtime CPU, 1 intra-op thread) at batch 1
and ``--latency-batch``: ``--rounds`` rounds, every round times each model once in a rotated order, and the reported
latency is the median of the round medians. Three forms per rate: "gn-after" (every export since issue 19:
GroupNorm's affine map as one BatchNormalization, ``exports/onnx_rewrites.py``), "gn-before" (``rewrites=False``:
torch.onnx's Reshape/InstanceNorm/Reshape/Mul/Add) and "bn" (the BatchNorm original built at the subnet's widths;
ORT folds its BN into the convs: what the norm would cost if it were free). Last, with nothing else running, the
training cost is timed side by side in one process (``step_timing``): one epoch of steps of conventional training,
of every (a) column on views and of N(1, 1/3) on the masked graph, and single steps at r = 1, 0.75, 0.5, 0.25 masked
and on views, ``--timing-rounds`` rounds in rotated order. Prints a rich table per model, writes
``bench/results/slice.json`` and ``bench/results/slice.png`` atomically.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import functools
import json
import multiprocessing
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from _measured import markdown_table, rich_table  # bench/_measured.py (this script's folder is on sys.path)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.models.resnet import BasicBlock, ResNet

from zoocompiler.core.atomic import atomic_path, write_json_atomic
from zoocompiler.core.modules import count_macs
from zoocompiler.core.rates import RATE_TOLERANCE, same_rate
from zoocompiler.data import load_dataset
from zoocompiler.exports.latency import measure_latency
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.rewrite.slicing import SliceableModel, make_sliceable
from zoocompiler.pipelines.slice.train import evaluate_rates, train_sliceable
from zoocompiler.pipelines.zoo.trainable import reset_parameters
from zoocompiler.solvers.slice_rates import SandwichScheduler, make_scheduler, valid_rates
from zoocompiler.training import evaluate, train
from zoocompiler.zoo import VGGClassifier

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = 16
TRACE_BATCH = 2
MODELS_AT: dict[str, Callable[[float], nn.Module]] = {  # the BatchNorm original at width r (the r-subnet's shapes)
    "vgg": lambda r: VGGClassifier((round(32 * r), "M", round(64 * r), "M", round(128 * r), round(128 * r), "M"), 10,
                                   hidden=round(256 * r)),
    "resnet": lambda r: ResNet(BasicBlock, (1, 1, 1, 1), in_chans=1, num_classes=10, stem_width=round(32 * r),
                               channels=tuple(round(c * r) for c in (32, 64, 128, 256))),
}
MODELS: dict[str, Callable[[], nn.Module]] = {name: functools.partial(build, 1.0) for name, build in MODELS_AT.items()}
MODEL_TEXT = {
    "vgg": 'zoocompiler.zoo.VGGClassifier((32, "M", 64, "M", 128, 128, "M"), 10, hidden=256)',
    "resnet": "timm ResNet(BasicBlock, (1, 1, 1, 1), in_chans=1, num_classes=10, stem_width=32, "
    "channels=(32, 64, 128, 256))",
}
# Targets of issues 5 and 19.
TARGET_RATE = 0.5
TARGET_SLICED_DROP = 0.02  # (a): accuracy at 0.5 within 2 points of its own r = 1
SMALL_RATE, TARGET_SMALL_DROP = 0.25, 0.10  # (a): accuracy at 0.25 within 10 points of its own r = 1
TARGET_FULL_VS_CONVENTIONAL = 0.01  # (a) at r = 1 within 1 point of (b), trained conventionally for the same epochs
TARGET_TRAIN_COST = 0.70  # (a)'s training time <= 0.7 × conventional training's (at least 30 % cheaper)
COLLAPSE_DROP = 0.20  # (b) "collapses": it loses at least 20 points from r = 1 to r = 0.5
TARGET_LATENCY_RATIO = 0.35  # ORT latency at 0.5 <= 0.35 × r = 1, at each timed batch
SCHEDULERS = {  # column name → (scheduler, options, in-place distillation)
    "normal": ("normal", (("mean", 1.0), ("std", 1 / 3)), False),
    "sandwich": ("sandwich", (("random", 2),), False),
    "sandwich+distill": ("sandwich", (("random", 2),), True),
    "prog-dynamic": ("progressive-dynamic", (("warmup", 0.3),), False),
    "prog-static": ("progressive-static", (), False),
}
NORM_FORMS = ("gn-after", "gn-before", "bn")
PAPER_FIXED_RATES = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)  # (c) by default: the paper's 1/8 steps
Tick = Callable[[int], None]


def rate_key(rate: float) -> str:
    """JSON key of a rate: its exact j/16 value printed with 4 decimals."""
    return f"{rate:.4f}"


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class TrainSetup:
    """What every training job shares (so a, b and c differ only in what they train)."""

    data: str
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    augment: bool
    seed: int


@dataclass(frozen=True)
class Job:
    """One independent training run: ``kind`` "sliced" (train_sliceable with lower bound ``lb`` and the ``scheduler``
    column of :data:`SCHEDULERS`; lb = 1 is (b)) or "fixed" (the ``rate``-subnet architecture trained alone, (c))."""

    model: str
    kind: str
    lb: float | None = None
    rate: float | None = None
    scheduler: str = "normal"

    @property
    def label(self) -> str:
        if self.kind == "fixed":
            return f"{self.model} (c) fixed r={self.rate:g}"
        if same_rate(self.lb, 1.0):
            return f"{self.model} (b) lb=1"
        return f"{self.model} (a) {self.scheduler} lb={self.lb:g}"


def fresh_sliceable(name: str, seed: int) -> SliceableModel:
    """``MODELS[name]`` built and re-initialised under ``seed``, traced on 1×28×28 and made sliceable (G = 16)."""
    torch.manual_seed(seed)
    model = reset_parameters(MODELS[name]())
    x = torch.randn(TRACE_BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return make_sliceable(trace(model, x), groups=GROUPS)


@functools.cache
def _initial_sliceable(name: str, seed: int) -> SliceableModel:
    """A worker's untrained sliceable model, only ever sliced (``slice`` copies): the (c) architectures."""
    return fresh_sliceable(name, seed)


def run_job(job: Job, setup: TrainSetup, eval_rates: tuple[float, ...], tick: Tick) -> dict[str, Any]:
    """Train one job from scratch and evaluate it; returns accuracy per rate key, timings and (for sliced
    jobs) the trained weights. ``tick(n)`` reports n finished optimisation steps."""
    torch.set_num_threads(1)
    train_split, test_split = load_dataset(setup.data, "train"), load_dataset(setup.data, "test")
    steps_per_epoch = len(train_split) // setup.batch_size if len(train_split) > setup.batch_size else 1
    common = dict(
        epochs=setup.epochs,
        lr=setup.lr,
        batch_size=setup.batch_size,
        weight_decay=setup.weight_decay,
        augment=setup.augment,
        seed=setup.seed,
        progress=False,
    )
    t0 = time.perf_counter()
    if job.kind == "sliced":
        model = fresh_sliceable(job.model, setup.seed)
        name, options, distill = SCHEDULERS[job.scheduler]
        scheduler = make_scheduler(name, valid_rates(GROUPS, job.lb), **dict(options))
        drawn: Counter[float] = Counter()

        def on_rate(rate: float) -> None:
            drawn[rate] += 1
            if rate == 1.0 or not isinstance(scheduler, SandwichScheduler):  # one tick per batch
                tick(1)

        history = train_sliceable(model, train_split, scheduler, on_rate=on_rate, distill=distill, **common)
        train_s = time.perf_counter() - t0
        per_rate = evaluate_rates(model, test_split, list(eval_rates))
        accuracy = {rate_key(r): row["accuracy"] for r, row in per_rate.items()}
        total = sum(drawn.values())
        extra = {
            "rates_drawn": {rate_key(r): n / total for r, n in sorted(drawn.items())},
            "state_dict": {k: v.detach().clone() for k, v in model.gm.state_dict().items()},
        }
    else:
        sub = _initial_sliceable(job.model, setup.seed).slice(job.rate).module
        torch.manual_seed(setup.seed)
        reset_parameters(sub)
        history = train(sub, train_split, on_epoch=lambda _stats: tick(steps_per_epoch), **common)
        train_s = time.perf_counter() - t0
        accuracy = {rate_key(job.rate): evaluate(sub, test_split)}
        extra = {}
    return {
        "job": asdict(job),
        "label": job.label,
        "accuracy": accuracy,
        "train_s": round(train_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "epoch_s": round(float(np.mean([e.seconds for e in history.epochs])), 2),
        "epoch_loss": [round(e.loss, 4) for e in history.epochs],
        **extra,
    }


def _put(queue: Any, n: int) -> None:
    queue.put(n)


PASSES = {"normal": 0.95, "sandwich": 2.4, "sandwich+distill": 2.4, "prog-dynamic": 0.95, "prog-static": 0.7}


def job_cost(job: Job, macs: dict[str, dict[str, int]]) -> float:
    """Rough relative cost for longest-first scheduling: a fixed job runs its own subnet; a sliced job on views about
    ``PASSES`` full-width passes per batch (the sandwich rule 4 passes of falling width); plus a per-step overhead of
    ~5 M MACs (measured on this machine)."""
    full = macs[job.model][rate_key(1.0)]
    if job.kind == "fixed":
        return macs[job.model][rate_key(job.rate)] + 5e6
    return full * (1.0 if same_rate(job.lb, 1.0) else PASSES[job.scheduler]) + 5e6


def run_jobs(
    jobs: list[Job], setup: TrainSetup, eval_rates: tuple[float, ...], workers: int, console: Console
) -> dict[Job, dict[str, Any]]:
    """Run every job (in ``workers`` spawned processes when > 1) under one rich progress bar over all steps."""
    train_len = len(load_dataset(setup.data, "train"))
    steps = setup.epochs * (train_len // setup.batch_size if train_len > setup.batch_size else 1)
    results: dict[Job, dict[str, Any]] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"training {len(jobs)} jobs", total=steps * len(jobs))
        if workers <= 1:
            for job in jobs:
                results[job] = run_job(job, setup, eval_rates, lambda n: progress.advance(task, n))
                console.log(f"{job.label}: {results[job]['train_s']} s")
            return results
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            queue = manager.Queue()
            tick = functools.partial(_put, queue)
            pending = {pool.submit(run_job, job, setup, eval_rates, tick): job for job in jobs}
            while pending:
                done, _ = futures.wait(pending, timeout=0.5, return_when=futures.FIRST_COMPLETED)
                while not queue.empty():
                    progress.advance(task, queue.get())
                for future in done:
                    job = pending.pop(future)
                    results[job] = future.result()
                    console.log(f"{job.label}: {results[job]['train_s']} s")
            while not queue.empty():
                progress.advance(task, queue.get())
    return results


# ----------------------------------------------------------------------------- slices, export, latency


def export_slices(
    model: SliceableModel,
    name: str,
    rates: tuple[float, ...],
    x: torch.Tensor,
    folder: Path,
    exporters: tuple[str, ...],
    seed: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """Export every r-subnet of ``model`` in each of :data:`NORM_FORMS` into ``folder`` (key ``"{form}/{rate}"``;
    "bn" is the BatchNorm original built at that width); returns size/parity facts per rate key (incl.
    |r-subnet − sliceable model at r| and |ORT gn-after − sliceable model at r| on ``x``) and the ONNX paths."""
    facts: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    model.eval()
    for r in rates:
        key, sliced = rate_key(r), model.slice(r)
        model.set_rate(r)
        with torch.no_grad():
            expected = model(x)
            slice_diff = float((sliced.module(x) - expected).abs().max())
        before = folder / f"gn-before_{key}.onnx"
        report_before = export_onnx(sliced.module, x, before, exporters=exporters, rewrites=False)
        after = folder / f"gn-after_{key}.onnx"
        report = export_onnx(sliced.module, x, after, exporters=exporters)
        norms = sum(isinstance(m, nn.GroupNorm) for m in sliced.module.modules())
        session = onnxruntime.InferenceSession(str(after), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.manual_seed(seed)
        bn = reset_parameters(MODELS_AT[name](r)).eval()
        bn_path = folder / f"bn_{key}.onnx"
        bn_report = export_onnx(bn, x, bn_path, exporters=exporters)
        facts[key] = {
            "params": sliced.params,
            "macs": sliced.macs,
            "macs_flop_counter": count_macs(sliced.module, x[:1]),
            "bn_macs": count_macs(bn, x[:1]),
            "groupnorms": norms,
            "slice_vs_masked_max_abs_diff": slice_diff,
            "onnx_vs_sliceable_max_abs_diff": float(np.abs(got - expected.numpy()).max()),
            "onnx_max_abs_diff": report.max_abs_diff,
            "onnx_nodes": {"gn-after": report.onnx_nodes, "gn-before": report_before.onnx_nodes,
                           "bn": bn_report.onnx_nodes},
            "exporter": report.exporter,
        }
        paths.update({f"gn-after/{key}": after, f"gn-before/{key}": before, f"bn/{key}": bn_path})
    model.set_rate(1.0)
    return facts, paths


TIMED_RATES = (1.0, 0.75, 0.5, 0.25)


def step_timing(name: str, setup: TrainSetup, columns: list[str], lb: float, rounds: int) -> dict[str, Any]:
    """Training cost measured side by side in this process (nothing else running), one torch thread: seconds per
    epoch (``steps`` = one epoch of AdamW steps on one fixed batch) of conventional training (r = 1), of every
    (a) column on views, and of N(1, 1/3) on the masked graph; and milliseconds per step at each of
    :data:`TIMED_RATES`, masked and on views. Each scheduler's rates are drawn for progress spread over the whole
    run (so progressive ones visit every stage). ``rounds`` rounds in rotated order; the median per entry. The
    views of every rate are built first (``view_build_s``, a one-off cost not in the epochs)."""
    torch.set_num_threads(1)
    train_split = load_dataset(setup.data, "train")
    x, y = train_split.x[: setup.batch_size], train_split.y[: setup.batch_size]
    steps = len(train_split) // setup.batch_size
    model = fresh_sliceable(name, setup.seed).train()
    t0 = time.perf_counter()
    for r in valid_rates(GROUPS, lb):
        model.subnet_view(r)
    view_build_s = time.perf_counter() - t0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    plans: dict[str, tuple[str, list[tuple[float, ...]]]] = {"conventional": ("views", [(1.0,)] * steps)}
    for column in ("normal", *columns):
        scheduler_name, options, _ = SCHEDULERS[column]
        scheduler = make_scheduler(scheduler_name, valid_rates(GROUPS, lb), **dict(options))
        rng = np.random.default_rng(setup.seed)
        plan = [scheduler.step_rates((i + 0.5) / steps, rng) if isinstance(scheduler, SandwichScheduler)
                else (scheduler.sample((i + 0.5) / steps, rng),) for i in range(steps)]
        plans[column] = ("views", plan)
        if column == "normal":
            plans["normal (masked)"] = ("masked", plan)
    for r in TIMED_RATES:
        for execution in ("masked", "views"):
            plans[f"step r={r:g} {execution}"] = (execution, [(r,)] * 10)

    def run(execution: str, plan: list[tuple[float, ...]]) -> float:
        model.execution = execution
        start = time.perf_counter()
        for rates in plan:
            optimizer.zero_grad(set_to_none=True)
            model.rate = rates if len(rates) > 1 else rates[0]
            out = model(x)
            loss = sum(F.cross_entropy(o, y) for o in (out if isinstance(out, tuple) else (out,)))
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    seconds: dict[str, list[float]] = {k: [] for k in plans}
    keys = list(plans)
    for i in range(rounds):
        for k in np.roll(np.array(keys, dtype=object), -i):
            seconds[k].append(run(*plans[k]))
    model.execution, model.rate = "masked", 1.0
    median = {k: float(np.median(v)) for k, v in seconds.items()}
    epochs = {k: median[k] for k in keys if not k.startswith("step ")}
    return {
        "steps_per_epoch": steps,
        "view_build_s": round(view_build_s, 3),
        "epoch_s": {k: round(v, 3) for k, v in epochs.items()},
        "vs_conventional": {k: round(v / epochs["conventional"], 3) for k, v in epochs.items()},
        "step_ms": {f"{r:g}": {e: round(1e3 * median[f"step r={r:g} {e}"] / 10, 2) for e in ("masked", "views")}
                    for r in TIMED_RATES},
        "rounds_s": {k: [round(t, 3) for t in v] for k, v in seconds.items()},
    }


def rotated_latency(
    paths: dict[str, Path], shape: tuple[int, ...], *, runs: int, warmup: int, rounds: int, threads: int
) -> dict[str, dict[str, Any]]:
    """``measure_latency`` of every model in ``rounds`` rounds (each round in a rotated order, so slow phases of
    the machine hit the models alike); per model the median of the round medians and the round medians."""
    keys = list(paths)
    medians: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(rounds):
        for k in np.roll(np.array(keys, dtype=object), -i):
            medians[k].append(measure_latency(paths[k], shape, runs=runs, warmup=warmup, threads=threads).median_ms)
    return {
        k: {"median_ms": float(np.median(v)), "round_medians_ms": [round(m, 4) for m in v]} for k, v in medians.items()
    }


# ----------------------------------------------------------------------------- assembling results


def model_rows(
    name: str,
    rates: tuple[float, ...],
    results: dict[Job, dict[str, Any]],
    facts: dict[str, dict[str, Any]],
    latency: dict[int, dict[str, dict[str, Any]]],
    lbs: tuple[float, ...],
) -> list[dict[str, Any]]:
    """One row per rate (1.0 first): sizes, MAC ratio, latency (ms) and latency ratio to r = 1 of each norm form
    (each form against its own r = 1), the GroupNorm share of latency (1 − bn / gn), accuracy of (a) per scheduler
    column (``acc_a``; extra lower bounds of N(1, 1/3) as "normal lb=…"), (b) and (c)."""
    mine = {job: res for job, res in results.items() if job.model == name}
    sliced = {(job.scheduler, job.lb): res for job, res in mine.items() if job.kind == "sliced"}
    fixed = {rate_key(job.rate): res for job, res in mine.items() if job.kind == "fixed"}
    full = facts[rate_key(1.0)]
    rows = []
    for r in sorted(rates, reverse=True):
        key = rate_key(r)
        row: dict[str, Any] = {"rate": r, **facts[key], "mac_ratio": facts[key]["macs"] / full["macs"]}
        row["param_ratio"] = facts[key]["params"] / full["params"]
        row["latency_ms"] = {f: {str(b): lat[f"{f}/{key}"]["median_ms"] for b, lat in latency.items()}
                             for f in NORM_FORMS}
        row["latency_round_medians_ms"] = {
            f: {str(b): lat[f"{f}/{key}"]["round_medians_ms"] for b, lat in latency.items()} for f in NORM_FORMS}
        row["latency_ratio"] = {
            f: {str(b): lat[f"{f}/{key}"]["median_ms"] / lat[f"{f}/{rate_key(1.0)}"]["median_ms"]
                for b, lat in latency.items()} for f in NORM_FORMS}
        row["gn_share"] = {
            f: {b: 1 - row["latency_ms"]["bn"][b] / ms for b, ms in row["latency_ms"][f].items()}
            for f in ("gn-before", "gn-after")}
        row["acc_a"] = {column: sliced[(column, lbs[0])]["accuracy"][key] for column in SCHEDULERS
                        if (column, lbs[0]) in sliced}
        row["acc_a"].update({f"normal lb={lb:g}": res["accuracy"][key] for (column, lb), res in sliced.items()
                             if column == "normal" and not same_rate(lb, 1.0) and not same_rate(lb, lbs[0])})
        conventional = [res for (_, lb), res in sliced.items() if same_rate(lb, 1.0)]
        row["acc_b"] = conventional[0]["accuracy"][key] if conventional else None
        row["acc_c"] = fixed[key]["accuracy"][key] if key in fixed else None
        rows.append(row)
    return rows


def best_scheduler(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """The column with the highest mean accuracy at r <= 0.5 among those within 1 point of N(1, 1/3) at r = 1 (does
    not lose at full width); N(1, 1/3) itself when no other qualifies."""
    full = rows[0]["acc_a"]
    small = [r for r in rows if r["rate"] <= TARGET_RATE + RATE_TOLERANCE]
    fit = [c for c in columns if c in full and full[c] >= full.get("normal", 0.0) - TARGET_FULL_VS_CONVENTIONAL]
    return max(fit or ["normal"], key=lambda c: float(np.mean([r["acc_a"][c] for r in small])))


def verdicts(models: dict[str, dict[str, Any]], default: str) -> list[dict[str, Any]]:
    """The targets per model for the ``default`` scheduler column: at r = 0.5 within 2 points of its own r = 1, at
    r = 0.25 within 10, at r = 1 within 1 point of conventional training (b), training time <= 0.7 × (b)'s; (b)
    collapsed (>= 20 points lost at 0.5); gn-after latency(0.5) <= 0.35 × latency(1) at each timed batch."""
    out = []
    for name, m in models.items():
        rows = {rate_key(r["rate"]): r for r in m["rows"]}
        full, half, small = (rows.get(rate_key(r)) for r in (1.0, TARGET_RATE, SMALL_RATE))
        if full is None or half is None:
            continue

        def add(target: str, value: float, met: bool, name: str = name, **extra: Any) -> None:
            out.append({"model": name, "target": target, "value": round(value, 4), "met": bool(met), **extra})

        drop = full["acc_a"][default] - half["acc_a"][default]
        add(f"(a) {default}: acc(1) - acc(0.5) <= {TARGET_SLICED_DROP:g}", drop, drop <= TARGET_SLICED_DROP)
        if small is not None:
            drop = full["acc_a"][default] - small["acc_a"][default]
            add(f"(a) {default}: acc(1) - acc(0.25) <= {TARGET_SMALL_DROP:g}", drop, drop <= TARGET_SMALL_DROP)
        if full["acc_b"] is not None:
            gap = full["acc_b"] - full["acc_a"][default]
            add(f"(a) {default}: acc_b(1) - acc_a(1) <= {TARGET_FULL_VS_CONVENTIONAL:g}", gap,
                gap <= TARGET_FULL_VS_CONVENTIONAL)
            drop_b = full["acc_b"] - half["acc_b"]
            add(f"(b) collapses: acc(1) - acc(0.5) >= {COLLAPSE_DROP:g}", drop_b, drop_b >= COLLAPSE_DROP)
        cost = m["step_timing"]["vs_conventional"].get(default)
        if cost is not None:
            add(f"(a) {default}: epoch time / conventional <= {TARGET_TRAIN_COST:g}", cost, cost <= TARGET_TRAIN_COST)
        for batch, ratio in half["latency_ratio"]["gn-after"].items():
            add(f"gn-after latency(0.5) / latency(1) <= {TARGET_LATENCY_RATIO:g} at batch {batch}", ratio,
                ratio <= TARGET_LATENCY_RATIO, mac_ratio=round(half["mac_ratio"], 4))
    return out


def _agreed_best(models: dict[str, dict[str, Any]]) -> str:
    """The models' common best column, or the one with the higher summed mean accuracy at r <= 0.5 when they differ."""
    picks = {m["best_scheduler"] for m in models.values()}
    if len(picks) == 1:
        return picks.pop()

    def small_mean(column: str) -> float:
        return sum(float(np.mean([r["acc_a"][column] for r in m["rows"] if r["rate"] <= TARGET_RATE + RATE_TOLERANCE]))
                   for m in models.values())

    return max(picks, key=small_mean)


# ----------------------------------------------------------------------------- table and plot


def _pct(value: float | None, untrained: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}" + ("*" if untrained else "")


def _columns(result: dict[str, Any], name: str) -> list[str]:
    """The (a) columns of one model, in the order of the setup's schedulers, extra lower bounds last."""
    return list(result["models"][name]["rows"][0]["acc_a"])


def table_cells(result: dict[str, Any], name: str) -> tuple[list[str], list[list[str]]]:
    """Column names and cell text of one model's table: r, MACs, MAC ratio, latency ratio (gn-after at each batch;
    bn and gn-before at the large batch), accuracy (%) of (a) per scheduler (* = below that lb, untrained), (b) and
    (c) ("—" = not trained at that rate)."""
    setup = result["setup"]
    batches = [str(b) for b in setup["latency_batches"]]
    big = batches[-1]
    lb = setup["lbs"][0]
    columns_a = _columns(result, name)
    columns = ["r", "MACs", "MAC ratio", *(f"lat b{b} gn-after" for b in batches), f"lat b{big} gn-before",
               f"lat b{big} bn", *(f"acc {c}" for c in columns_a), "acc (b) lb=1", "acc (c) fixed"]
    rows = []
    for row in result["models"][name]["rows"]:
        cells = [f"{row['rate']:g}", f"{row['macs'] / 1e6:.2f}M", f"{row['mac_ratio']:.3f}"]
        cells += [f"{row['latency_ratio']['gn-after'][b]:.3f}" for b in batches]
        cells += [f"{row['latency_ratio']['gn-before'][big]:.3f}", f"{row['latency_ratio']['bn'][big]:.3f}"]
        for c in columns_a:
            low = float(c.split("lb=")[1]) if "lb=" in c else lb
            cells.append(_pct(row["acc_a"][c], row["rate"] < low - RATE_TOLERANCE))
        cells += [_pct(row["acc_b"]), _pct(row["acc_c"])]
        rows.append(cells)
    return columns, rows


def norm_cells(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Latency (ms) of each norm form at r = 1 and r = 0.5 per model and batch, and GroupNorm's share of it
    (1 − bn / gn) before and after."""
    columns = ["model", "batch", "r", "bn ms", "gn-before ms", "gn-after ms", "GN share before", "GN share after",
               "gn-after speed-up"]
    rows = []
    for name, m in result["models"].items():
        by_rate = {rate_key(r["rate"]): r for r in m["rows"]}
        for b in (str(b) for b in result["setup"]["latency_batches"]):
            for r in (1.0, TARGET_RATE):
                row = by_rate[rate_key(r)]
                ms = row["latency_ms"]
                rows.append([name, b, f"{r:g}", f"{ms['bn'][b]:.3f}", f"{ms['gn-before'][b]:.3f}",
                             f"{ms['gn-after'][b]:.3f}", f"{100 * row['gn_share']['gn-before'][b]:.0f} %",
                             f"{100 * row['gn_share']['gn-after'][b]:.0f} %",
                             f"{ms['gn-before'][b] / ms['gn-after'][b]:.2f}×"])
    return columns, rows


def cost_cells(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Seconds per training epoch of conventional training, each (a) column on views and N(1, 1/3) masked, as a ratio
    to conventional; then ms per step at each timed rate, masked and on views (the side-by-side timing)."""
    columns = ["model", "training", "s / epoch", "vs conventional", "", "rate", "ms/step masked", "ms/step views",
               "views / masked"]
    rows = []
    for name, m in result["models"].items():
        t = m["step_timing"]
        epochs = [[name, k, f"{v:.2f}", f"{t['vs_conventional'][k]:.2f}"] for k, v in t["epoch_s"].items()]
        steps = [[f"{r}", f"{ms['masked']:.1f}", f"{ms['views']:.1f}", f"{ms['views'] / ms['masked']:.2f}"]
                 for r, ms in t["step_ms"].items()]
        for i in range(max(len(epochs), len(steps))):
            left = epochs[i] if i < len(epochs) else ["", "", "", ""]
            right = steps[i] if i < len(steps) else ["", "", "", ""]
            rows.append([*left, "", *right])
    return columns, rows


def _title(result: dict[str, Any], name: str) -> str:
    setup = result["setup"]
    fixed = ", ".join(f"{r:g}" for r in setup["fixed_rates"])
    return (
        f"{name}: {setup['data']} test accuracy (%) per scheduler (lb {setup['lbs'][0]:g}) and ORT latency ratio to "
        f"r = 1 per slice rate ({setup['epochs']} epochs; (c) trained at r ∈ {{{fixed}}}; * = below that lb, untrained)"
    )


def _tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of every table, in the order they are shown."""
    out = [(_title(result, name), *table_cells(result, name)) for name in result["models"]]
    out.append(("GroupNorm at run time: latency (ms) and GroupNorm's share of it", *norm_cells(result)))
    out.append(("training cost, side by side in one process (one torch thread, batch "
                f"{result['setup']['batch_size']}, AdamW)", *cost_cells(result)))
    verdict = [[v["model"], v["target"], f"{v['value']:.4f}", "yes" if v["met"] else "NO"] for v in result["verdicts"]]
    out.append((f"targets (default scheduler: {result['default_scheduler']})", ["model", "target", "value", "met"],
                verdict))
    return out


def render(console: Console, result: dict[str, Any]) -> None:
    """Every table of :func:`_tables` as a rich table."""
    for title, columns, rows in _tables(result):
        console.print(rich_table(title, columns, rows))


def markdown(result: dict[str, Any]) -> str:
    """The same tables as ``render`` in Markdown (for docs/bench_slice.md); a missed target reads **no**."""
    out = []
    for title, columns, rows in _tables(result):
        out += markdown_table(columns, ([c if c != "NO" else "**no**" for c in cells] for cells in rows), title=title)
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy vs r (one panel per model: (a) per scheduler, b, c) and latency ratio vs MAC ratio per norm form;
    written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup, models = result["setup"], result["models"]
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5.6 * (len(models) + 1), 4.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        rates = [r["rate"] for r in m["rows"]]
        for column in _columns(result, name):
            ax.plot(rates, [100 * r["acc_a"][column] for r in m["rows"]], "o-", ms=3, label=f"(a) {column}")
        ax.plot(rates, [100 * r["acc_b"] for r in m["rows"]], "s-", ms=3, label="(b) trained at r=1, sliced")
        fixed = [(r["rate"], 100 * r["acc_c"]) for r in m["rows"] if r["acc_c"] is not None]
        if fixed:
            ax.plot(*zip(*fixed), "^:", label="(c) fixed width, trained alone")
        ax.set(xlabel="slice rate r", ylabel="test accuracy (%)", title=f"{name} on {setup['data']}", ylim=(0, 100),
               xlim=(0.2, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[0][-1]
    big = str(setup["latency_batches"][-1])
    top = 1.0
    for name, marker in zip(models, ("o", "s", "^", "D")):
        rows = models[name]["rows"]
        for form, style in zip(NORM_FORMS, ("-", "--", ":")):
            pts = [(r["mac_ratio"], r["latency_ratio"][form][big]) for r in rows]
            top = max(top, *(p[1] for p in pts))
            ax.plot(*zip(*pts), marker=marker, ls=style, lw=0.8, ms=3, label=f"{name} {form}, batch {big}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.6, label="latency ∝ MACs")
    ax.axhline(TARGET_LATENCY_RATIO, color="gray", ls=":", lw=0.8, label=f"target at r=0.5 ({TARGET_LATENCY_RATIO:g})")
    ax.set(xlabel="MAC ratio (r-subnet / full)", ylabel="ORT latency ratio to r = 1",
           title="latency vs MACs (ORT CPU, 1 thread)", xlim=(0, 1.05), ylim=(0, top + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def parse_rates(text: str) -> tuple[float, ...]:
    """Comma-separated rates snapped to multiples of 1/16 ("all" = every rate from 0.25 to 1)."""
    if text == "all":
        return tuple(valid_rates(GROUPS, 0.25))
    return tuple(sorted({round(float(t) * GROUPS) / GROUPS for t in text.split(",") if t.strip()}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, rates 1/0.75/0.5/0.25, (c) at 1/0.5/0.25")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--epochs", type=int, help="epochs of every training run (default 20; 2 with --quick)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (OneCycle, AdamW)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lb", type=float, default=0.25, help="lower bound of the slicing-trained model (a)")
    parser.add_argument("--extra-lb", default="", help="more N(1, 1/3) lower bounds for (a), comma-separated")
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS),
                        help=f"(a) columns, comma-separated subset of: {', '.join(SCHEDULERS)}")
    parser.add_argument("--timing-rounds", type=int, help="rounds of the side-by-side training-step timing (default 3; "
                        "1 with --quick)")
    parser.add_argument("--rates", help="evaluated rates, comma-separated or 'all' (default all: 0.25..1 by 1/16)")
    parser.add_argument(
        "--fixed-rates", help="rates of the fixed-width models (c), or 'all' (default 0.25,0.375,...,1 by 1/8)"
    )
    parser.add_argument("--latency-batch", type=int, default=64, help="the compute-bound batch timed besides 1")
    parser.add_argument("--rounds", type=int, help="latency rounds (default 5; 2 with --quick)")
    parser.add_argument(
        "--runs",
        type=int,
        help="timed runs per round at batch 1 (default 100; 30 with --quick); "
        "a tenth of it (at least 5) at the large batch",
    )
    parser.add_argument("--default-scheduler", choices=list(SCHEDULERS),
                        help="the column the targets are checked on (default: the best of both models, best_scheduler)")
    parser.add_argument("--exporter", default="torchscript", help="export_onnx exporters (dynamo: ~10× slower)")
    parser.add_argument("--jobs", type=int, default=2, help="training worker processes (1 = in this process)")
    parser.add_argument("--out", type=Path, default=RESULTS / "slice.json", help="JSON results path (PNG beside it)")
    parser.add_argument("--render-only", action="store_true", help="re-print tables and redraw the plot from --out")
    parser.add_argument("--markdown", action="store_true", help="with --render-only: print the tables as Markdown")
    args = parser.parse_args(argv)
    q = args.quick
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; use some of: {', '.join(MODELS)}")
    args.epochs = args.epochs or (2 if q else 20)
    args.rates = parse_rates(args.rates or ("0.25,0.5,0.75,1" if q else "all"))
    if not any(same_rate(SMALL_RATE, r) for r in args.rates) or args.lb > SMALL_RATE + RATE_TOLERANCE:
        parser.error(f"--rates must include {SMALL_RATE:g} and --lb must be at most {SMALL_RATE:g} (a target rate)")
    args.fixed_rates = parse_rates(args.fixed_rates or ("0.25,0.5,1" if q else ",".join(map(str, PAPER_FIXED_RATES))))
    args.lbs = tuple(dict.fromkeys([args.lb, *(float(t) for t in args.extra_lb.split(",") if t.strip())]))
    args.schedulers = [c for c in args.schedulers.split(",") if c]
    if "normal" not in args.schedulers or any(c not in SCHEDULERS for c in args.schedulers):
        parser.error(f"--schedulers must include normal and name only: {', '.join(SCHEDULERS)}")
    args.timing_rounds = args.timing_rounds or (1 if q else 3)
    if args.default_scheduler is not None and args.default_scheduler not in args.schedulers:
        parser.error(f"--default-scheduler {args.default_scheduler} is not one of --schedulers")
    args.rounds = args.rounds or (2 if q else 5)
    args.runs = args.runs or (30 if q else 100)
    missing = [r for r in (1.0, TARGET_RATE, *args.fixed_rates) if not any(same_rate(r, e) for e in args.rates)]
    if missing:
        parser.error(f"--rates must include 1, {TARGET_RATE} and every --fixed-rates rate; missing {missing}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 170)
    if args.render_only:
        result = json.loads(args.out.read_text())
        plot(result, args.out.with_suffix(".png"))
        if args.markdown:
            print(markdown(result), end="")
        else:
            render(console, result)
        return 0
    started = time.perf_counter()
    torch.set_num_threads(1)
    setup = TrainSetup(
        data="mnist5k",
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        augment=True,
        seed=args.seed,
    )
    test_split = load_dataset(setup.data, "test")
    x = test_split.x[:TRACE_BATCH].clone()

    # sizes first (cheap): they order the jobs longest-first
    initial = {name: fresh_sliceable(name, setup.seed) for name in args.models}
    macs = {name: {rate_key(r): sm.macs_at(r) for r in args.rates} for name, sm in initial.items()}
    jobs = [Job(name, "sliced", lb=args.lb, scheduler=c) for name in args.models for c in args.schedulers]
    jobs += [Job(name, "sliced", lb=lb) for name in args.models for lb in (*args.lbs[1:], 1.0)]
    jobs += [Job(name, "fixed", rate=r) for name in args.models for r in args.fixed_rates]
    jobs.sort(key=lambda j: -job_cost(j, macs))
    t0 = time.perf_counter()
    results = run_jobs(jobs, setup, args.rates, args.jobs, console)
    training_s = time.perf_counter() - t0

    models: dict[str, dict[str, Any]] = {}
    batches = (1, args.latency_batch)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zc_bench_slice_") as tmp:
        for name in args.models:
            trained = initial[name]
            state = results[Job(name, "sliced", lb=args.lb, scheduler="normal")]["state_dict"]
            trained.gm.load_state_dict(state)
            folder = Path(tmp) / name
            folder.mkdir()
            facts, paths = export_slices(trained, name, args.rates, x, folder, tuple(args.exporter.split(",")),
                                         setup.seed)
            latency = {}
            for batch in batches:
                runs = args.runs if batch == 1 else max(5, args.runs // 10)
                latency[batch] = rotated_latency(
                    paths,
                    (batch, *test_split.input_shape),
                    runs=runs,
                    warmup=max(3, runs // 10),
                    rounds=args.rounds,
                    threads=1,
                )
                console.log(f"{name}: timed {len(paths)} ONNX models at batch {batch}")
            rows = model_rows(name, args.rates, results, facts, latency, args.lbs)
            models[name] = {
                "rows": rows,
                "best_scheduler": best_scheduler(rows, args.schedulers),
                "jobs": [
                    {k: v for k, v in r.items() if k != "state_dict"} for j, r in results.items() if j.model == name
                ],
            }
    latency_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in args.models:
        models[name]["step_timing"] = step_timing(name, setup, args.schedulers, args.lb, args.timing_rounds)
        console.log(f"{name}: timed training steps side by side")
    timing_s = time.perf_counter() - t0
    result = {
        "setup": {
            **asdict(setup),
            "schedulers": {c: {"scheduler": SCHEDULERS[c][0], "options": dict(SCHEDULERS[c][1]),
                               "distill": SCHEDULERS[c][2]} for c in args.schedulers},
            "quick": args.quick,
            "models": {name: MODEL_TEXT[name] for name in args.models},
            "groups": GROUPS,
            "input_shape": list(test_split.input_shape),
            "lbs": list(args.lbs),
            "rates": list(args.rates),
            "fixed_rates": list(args.fixed_rates),
            "latency_batches": list(batches),
            "latency_rounds": args.rounds,
            "latency_runs": args.runs,
            "ort_threads": 1,
            "torch_threads": 1,
            "exporters": args.exporter.split(","),
            "workers": args.jobs,
            "provider": "CPUExecutionProvider",
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "timm": timm.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "numpy": np.__version__,
            },
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": multiprocessing.cpu_count(),
            "training_s": round(training_s, 1),
            "export_latency_s": round(latency_s, 1),
            "step_timing_s": round(timing_s, 1),
            "timing_rounds": args.timing_rounds,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "models": models,
    }
    result["default_scheduler"] = args.default_scheduler or _agreed_best(models)
    result["verdicts"] = verdicts(models, result["default_scheduler"])
    write_json_atomic(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    render(console, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
