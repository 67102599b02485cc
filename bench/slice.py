"""Model-slicing benchmark (paper 003, issue 5): accuracy per slice rate for slicing-trained, conventionally
trained-then-sliced and fixed-width models, plus ONNX Runtime latency of every r-subnet.

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

(a) slicing-trained: ``train_sliceable`` with the dynamic N(1, 1/3) scheduler over the valid rates ≥ lb
    (lb = 0.25, so every reported rate is trained; ``--extra-lb 0.375`` adds the paper's lb as a second column);
(b) conventionally trained, then sliced: the same sliceable model with lb = 1.0 (every batch at r = 1);
(c) fixed-width: the r-subnet architecture (``sm_init.slice(r).module`` of a fresh sliceable model, re-initialised)
    trained alone with ``zoocompiler.training.train``, at ``--fixed-rates`` (default the paper's 0.25..1 by 1/8).

Accuracy is measured on the materialised r-subnets (``evaluate_rates``). The training jobs are independent and
seeded (one torch thread each), so they run in ``--jobs`` worker processes with identical results. After every job
has finished (nothing else of ours running), each r-subnet of the slicing-trained (a) model is exported with
``export_onnx`` (parity-checked) and timed with ``measure_latency`` (ONNX Runtime CPU, 1 intra-op thread) at batch 1
and ``--latency-batch``: ``--rounds`` rounds, every round times each rate once in a rotated order, and the reported
latency is the median of the round medians. The original BatchNorm model (BN folded into the convs by ORT) is
timed alongside as a reference for GroupNorm's cost. Prints a rich table per model, writes
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
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from timm.models.resnet import BasicBlock, ResNet

from zoocompiler.core.atomic import atomic_path, write_json_atomic
from zoocompiler.core.modules import count_macs, count_params
from zoocompiler.core.rates import RATE_TOLERANCE, same_rate
from zoocompiler.data import load_dataset
from zoocompiler.exports.latency import measure_latency
from zoocompiler.exports.onnx_export import export_onnx
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.rewrite.slicing import SliceableModel, make_sliceable
from zoocompiler.pipelines.slice.train import evaluate_rates, train_sliceable
from zoocompiler.pipelines.zoo.trainable import reset_parameters
from zoocompiler.solvers.slice_rates import make_scheduler, valid_rates
from zoocompiler.training import evaluate, train
from zoocompiler.zoo import VGGClassifier

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = 16
TRACE_BATCH = 2
MODELS: dict[str, Callable[[], nn.Module]] = {
    "vgg": lambda: VGGClassifier((32, "M", 64, "M", 128, 128, "M"), 10, hidden=256),
    "resnet": lambda: ResNet(
        BasicBlock, (1, 1, 1, 1), in_chans=1, num_classes=10, stem_width=32, channels=(32, 64, 128, 256)
    ),
}
MODEL_TEXT = {
    "vgg": 'zoocompiler.zoo.VGGClassifier((32, "M", 64, "M", 128, 128, "M"), 10, hidden=256)',
    "resnet": "timm ResNet(BasicBlock, (1, 1, 1, 1), in_chans=1, num_classes=10, stem_width=32, "
    "channels=(32, 64, 128, 256))",
}
# Targets of issue 5, checked at r = 0.5.
TARGET_RATE = 0.5
TARGET_SLICED_DROP = 0.02  # (a): accuracy at 0.5 within 2 points of its own r = 1
COLLAPSE_DROP = 0.20  # (b) "collapses": it loses at least 20 points from r = 1 to r = 0.5
TARGET_LATENCY_RATIO = 0.35  # ORT latency at 0.5 <= 0.35 × r = 1, at each timed batch
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
    scheduler: str  # dynamic scheduler of the slicing-trained runs
    scheduler_options: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Job:
    """One independent training run: ``kind`` "sliced" (train_sliceable with lower bound ``lb``; lb = 1 is (b))
    or "fixed" (the ``rate``-subnet architecture trained alone, (c))."""

    model: str
    kind: str
    lb: float | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        if self.kind == "fixed":
            return f"{self.model} (c) fixed r={self.rate:g}"
        return f"{self.model} ({'b' if same_rate(self.lb, 1.0) else 'a'}) lb={self.lb:g}"


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
        scheduler = make_scheduler(setup.scheduler, valid_rates(GROUPS, job.lb), **dict(setup.scheduler_options))
        drawn: Counter[float] = Counter()

        def on_rate(rate: float) -> None:
            drawn[rate] += 1
            tick(1)

        history = train_sliceable(model, train_split, scheduler, on_rate=on_rate, **common)
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
        "epoch_loss": [round(e.loss, 4) for e in history.epochs],
        **extra,
    }


def _put(queue: Any, n: int) -> None:
    queue.put(n)


def job_cost(job: Job, macs: dict[str, dict[str, int]]) -> float:
    """Rough relative cost for longest-first scheduling: a sliced job runs the full-width graph (masked weights)
    every step; a fixed job its own subnet; plus a per-step overhead of ~5 M MACs (measured on this machine)."""
    rate = 1.0 if job.kind == "sliced" else job.rate
    return macs[job.model][rate_key(rate)] + 5e6


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
    rates: tuple[float, ...],
    reference: nn.Module,
    x: torch.Tensor,
    folder: Path,
    exporters: tuple[str, ...],
) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """Export every r-subnet of ``model`` (and the BatchNorm ``reference`` as key "bn") into ``folder``;
    returns size/parity facts per key (incl. |r-subnet − sliceable model at r| on ``x``) and the ONNX paths."""
    facts: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    model.eval()
    for r in rates:
        key, sliced = rate_key(r), model.slice(r)
        model.set_rate(r)
        with torch.no_grad():
            slice_diff = float((sliced.module(x) - model(x)).abs().max())
        path = folder / f"rate_{key}.onnx"
        report = export_onnx(sliced.module, x, path, exporters=exporters)
        facts[key] = {
            "params": sliced.params,
            "macs": sliced.macs,
            "macs_flop_counter": count_macs(sliced.module, x[:1]),
            "slice_vs_masked_max_abs_diff": slice_diff,
            "onnx_max_abs_diff": report.max_abs_diff,
            "onnx_nodes": report.onnx_nodes,
            "exporter": report.exporter,
        }
        paths[key] = path
    path = folder / "bn_reference.onnx"
    report = export_onnx(reference.eval(), x, path, exporters=exporters)
    facts["bn"] = {
        "params": count_params(reference),
        "macs": count_macs(reference, x[:1]),
        "onnx_max_abs_diff": report.max_abs_diff,
        "onnx_nodes": report.onnx_nodes,
        "exporter": report.exporter,
    }
    paths["bn"] = path
    model.set_rate(1.0)
    return facts, paths


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
    """One row per rate (1.0 first): sizes, MAC and latency ratios to r = 1, accuracy of a (per lb), b, c."""
    sliced = {job.lb: res for job, res in results.items() if job.model == name and job.kind == "sliced"}
    fixed = {rate_key(job.rate): res for job, res in results.items() if job.model == name and job.kind == "fixed"}
    full = facts[rate_key(1.0)]
    rows = []
    for r in sorted(rates, reverse=True):
        key = rate_key(r)
        row: dict[str, Any] = {"rate": r, **facts[key], "mac_ratio": facts[key]["macs"] / full["macs"]}
        row["param_ratio"] = facts[key]["params"] / full["params"]
        row["latency_ms"] = {str(b): lat[key]["median_ms"] for b, lat in latency.items()}
        row["latency_round_medians_ms"] = {str(b): lat[key]["round_medians_ms"] for b, lat in latency.items()}
        row["latency_ratio"] = {
            str(b): lat[key]["median_ms"] / lat[rate_key(1.0)]["median_ms"] for b, lat in latency.items()
        }
        row["acc_a"] = {rate_key(lb): sliced[lb]["accuracy"][key] for lb in lbs if lb in sliced}
        row["acc_b"] = sliced[1.0]["accuracy"][key] if 1.0 in sliced else None
        row["acc_c"] = fixed[key]["accuracy"][key] if key in fixed else None
        rows.append(row)
    return rows


def verdicts(models: dict[str, dict[str, Any]], primary_lb: float) -> list[dict[str, Any]]:
    """The issue's targets per model at r = 0.5: (a) within 2 points of its own r = 1, (b) collapsed (>= 20 points
    lost), and ORT latency <= 0.35× r = 1 at each timed batch."""
    out = []
    for name, m in models.items():
        rows = {rate_key(r["rate"]): r for r in m["rows"]}
        full, half = rows.get(rate_key(1.0)), rows.get(rate_key(TARGET_RATE))
        if full is None or half is None:
            continue
        lb = rate_key(primary_lb)
        drop_a = full["acc_a"][lb] - half["acc_a"][lb]
        out.append(
            {
                "model": name,
                "target": f"(a) lb={primary_lb:g}: acc(1) - acc(0.5) <= {TARGET_SLICED_DROP:g}",
                "value": round(drop_a, 4),
                "met": drop_a <= TARGET_SLICED_DROP,
            }
        )
        if full["acc_b"] is not None:
            drop_b = full["acc_b"] - half["acc_b"]
            out.append(
                {
                    "model": name,
                    "target": f"(b) collapses: acc(1) - acc(0.5) >= {COLLAPSE_DROP:g}",
                    "value": round(drop_b, 4),
                    "met": drop_b >= COLLAPSE_DROP,
                }
            )
        for batch, ratio in half["latency_ratio"].items():
            out.append(
                {
                    "model": name,
                    "target": f"latency(0.5) / latency(1) <= {TARGET_LATENCY_RATIO:g} at batch {batch}",
                    "value": round(ratio, 4),
                    "mac_ratio": round(half["mac_ratio"], 4),
                    "met": ratio <= TARGET_LATENCY_RATIO,
                }
            )
    return out


# ----------------------------------------------------------------------------- table and plot


def _pct(value: float | None, untrained: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}" + ("*" if untrained else "")


def table_cells(result: dict[str, Any], name: str) -> tuple[list[str], list[list[str]]]:
    """Column names and cell text of one model's table: r, MACs, MAC ratio, latency ratio per batch, accuracy (%)
    of a (per lb; * = rate below that lb, untrained), b and c ("—" = not trained at that rate)."""
    setup = result["setup"]
    lbs, batches = setup["lbs"], [str(b) for b in setup["latency_batches"]]
    columns = [
        "r",
        "MACs",
        "MAC ratio",
        *(f"lat ratio b{b}" for b in batches),
        *(f"acc (a) lb={lb:g}" for lb in lbs),
        "acc (b) lb=1",
        "acc (c) fixed",
    ]
    rows = []
    for row in result["models"][name]["rows"]:
        cells = [f"{row['rate']:g}", f"{row['macs'] / 1e6:.2f}M", f"{row['mac_ratio']:.3f}"]
        cells += [f"{row['latency_ratio'][b]:.3f}" for b in batches]
        cells += [_pct(row["acc_a"].get(rate_key(lb)), row["rate"] < lb - RATE_TOLERANCE) for lb in lbs]
        cells += [_pct(row["acc_b"]), _pct(row["acc_c"])]
        rows.append(cells)
    return columns, rows


def _title(result: dict[str, Any], name: str) -> str:
    setup = result["setup"]
    fixed = ", ".join(f"{r:g}" for r in setup["fixed_rates"])
    return (
        f"{name}: {setup['data']} test accuracy (%) and ORT latency ratio per slice rate "
        f"({setup['epochs']} epochs; (c) trained at r ∈ {{{fixed}}}; * = below that lb, untrained)"
    )


def _norm_cost(result: dict[str, Any], name: str) -> str:
    batches = [str(b) for b in result["setup"]["latency_batches"]]
    bn, full = result["models"][name]["bn_reference"], result["models"][name]["rows"][0]
    return f"{name} r=1 latency: " + ", ".join(
        f"b{b} {full['latency_ms'][b]:.3f} ms (GroupNorm) vs {bn['latency_ms'][b]:.3f} ms (BatchNorm original, "
        f"{full['latency_ms'][b] / bn['latency_ms'][b]:.2f}×)"
        for b in batches
    )


def render(console: Console, result: dict[str, Any]) -> None:
    """A rich table per model (``table_cells``), the GroupNorm vs BatchNorm latency at r = 1, and the verdicts."""
    for name in result["models"]:
        columns, rows = table_cells(result, name)
        table = Table(title=_title(result, name))
        for col in columns:
            table.add_column(col, justify="right")
        for cells in rows:
            table.add_row(*cells)
        console.print(table)
        console.print("  " + _norm_cost(result, name))
    verdict = Table(title="targets at r = 0.5")
    for col in ("model", "target", "value", "met"):
        verdict.add_column(col)
    for v in result["verdicts"]:
        verdict.add_row(v["model"], v["target"], f"{v['value']:.4f}", "yes" if v["met"] else "NO")
    console.print(verdict)


def markdown(result: dict[str, Any]) -> str:
    """The same tables as ``render`` in Markdown (for docs/bench_slice.md)."""
    out = []
    for name in result["models"]:
        columns, rows = table_cells(result, name)
        out += [f"**{_title(result, name)}**", "", "| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
        out += ["| " + " | ".join(cells) + " |" for cells in rows]
        out += ["", _norm_cost(result, name), ""]
    out += ["| model | target | value | met |", "|---|---|---:|---|"]
    out += [
        f"| {v['model']} | {v['target']} | {v['value']:.4f} | {'yes' if v['met'] else '**no**'} |"
        for v in result["verdicts"]
    ]
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy vs r (one panel per model: a per lb, b, c) and latency ratio vs MAC ratio; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup, models = result["setup"], result["models"]
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5.2 * (len(models) + 1), 4.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        rates = [r["rate"] for r in m["rows"]]
        for lb, style in zip(setup["lbs"], ("o-", "o--")):
            ax.plot(rates, [100 * r["acc_a"][rate_key(lb)] for r in m["rows"]], style, label=f"(a) sliced, lb={lb:g}")
        ax.plot(rates, [100 * r["acc_b"] for r in m["rows"]], "s-", label="(b) trained at r=1, sliced")
        fixed = [(r["rate"], 100 * r["acc_c"]) for r in m["rows"] if r["acc_c"] is not None]
        if fixed:
            ax.plot(*zip(*fixed), "^:", label="(c) fixed width, trained alone")
        ax.set(
            xlabel="slice rate r",
            ylabel="test accuracy (%)",
            title=f"{name} on {setup['data']}",
            ylim=(0, 100),
            xlim=(0.2, 1.02),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes[0][-1]
    top = max(r["latency_ratio"][str(b)] for m in models.values() for r in m["rows"] for b in setup["latency_batches"])
    for name, marker in zip(models, ("o", "s", "^", "D")):
        rows = models[name]["rows"]
        for batch, fill in zip(setup["latency_batches"], ("full", "none")):
            pts = [(r["mac_ratio"], r["latency_ratio"][str(batch)]) for r in rows]
            ax.plot(*zip(*pts), marker=marker, fillstyle=fill, ls="-", lw=0.8, label=f"{name}, batch {batch}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="latency ∝ MACs")
    ax.axhline(TARGET_LATENCY_RATIO, color="gray", ls=":", lw=0.8, label=f"target at r=0.5 ({TARGET_LATENCY_RATIO:g})")
    ax.set(
        xlabel="MAC ratio (r-subnet / full)",
        ylabel="ORT latency ratio",
        title="latency vs MACs (ORT CPU, 1 thread)",
        xlim=(0, 1.05),
        ylim=(0, max(1.1, top + 0.05)),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    parser.add_argument("--extra-lb", help="more (a) lower bounds, comma-separated (default 0.375; none with --quick)")
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
    args.fixed_rates = parse_rates(args.fixed_rates or ("0.25,0.5,1" if q else ",".join(map(str, PAPER_FIXED_RATES))))
    extra = args.extra_lb if args.extra_lb is not None else ("" if q else "0.375")
    args.lbs = tuple(dict.fromkeys([args.lb, *(float(t) for t in extra.split(",") if t.strip())]))
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
        scheduler="normal",
        scheduler_options=(("mean", 1.0), ("std", 1 / 3)),
    )
    test_split = load_dataset(setup.data, "test")
    x = test_split.x[:TRACE_BATCH].clone()

    # sizes first (cheap): they order the jobs longest-first
    initial = {name: fresh_sliceable(name, setup.seed) for name in args.models}
    macs = {name: {rate_key(r): sm.macs_at(r) for r in args.rates} for name, sm in initial.items()}
    jobs = [Job(name, "sliced", lb=lb) for name in args.models for lb in (*args.lbs, 1.0)]
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
            state = next(r["state_dict"] for j, r in results.items() if j == Job(name, "sliced", lb=args.lb))
            trained.gm.load_state_dict(state)
            torch.manual_seed(setup.seed)
            reference = reset_parameters(MODELS[name]()).eval()  # the BatchNorm original, same shapes at r = 1
            folder = Path(tmp) / name
            folder.mkdir()
            facts, paths = export_slices(trained, args.rates, reference, x, folder, tuple(args.exporter.split(",")))
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
                "bn_reference": {**facts["bn"], "latency_ms": {str(b): latency[b]["bn"]["median_ms"] for b in batches}},
                "jobs": [
                    {k: v for k, v in r.items() if k != "state_dict"} for j, r in results.items() if j.model == name
                ],
            }
    latency_s = time.perf_counter() - t0
    result = {
        "setup": {
            **{k: v for k, v in asdict(setup).items() if k != "scheduler_options"},
            "scheduler_options": dict(setup.scheduler_options),
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
            "seconds": round(time.perf_counter() - started, 1),
        },
        "models": models,
    }
    result["verdicts"] = verdicts(models, args.lb)
    write_json_atomic(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    render(console, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
