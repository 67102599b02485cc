"""Analysis speed benchmark (issue 16, item 6): ``zoocompiler.trace`` vs Torch-Pruning's ``build_dependency``.

Usage::

    python bench/analysis_speed.py                 # 4 models × 224 and 64 px (see docs/bench_analysis_speed.md)
    python bench/analysis_speed.py --quick         # resnet50 + mobilenet_v3_large at 64 px, 3 runs
    python bench/analysis_speed.py --models vit_small --sizes 64 --runs 9
    python bench/analysis_speed.py --render-only   # re-print the tables from bench/results/analysis_speed.json

One process, ``torch.set_num_threads(1)``, batch 1, random weights. Per model and input size: the median
wall time (after ``--warmup`` untimed calls) of ``zoocompiler.trace(model, x)`` (tracing + every analysis
pass) and of ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=x)``, alternated so
load from other processes hits both alike; the ratio is checked against the target (≤ 2×). A per-stage
breakdown of zoocompiler's time (fx tracing, the shared run of the example input, each pass) shows where
it goes; ``digest`` is a sha256 of the analysis results (cut points, unit groups with pins, per-node
shapes, layouts and costs), so runs before and after a change can be checked for the same results.
Writes ``bench/results/analysis_speed.json`` and ``.png``. Torch-Pruning is the bench-only extra
(``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from _measured import rederived, run_measured, show  # bench/_measured.py (this script's folder is on sys.path)
from rich.console import Console
from rich.table import Table

from zoocompiler.core.plots import pyplot, save_png
from zoocompiler.ir import graph_info, node_info
from zoocompiler.passes.analysis import gc_paused, trace
from zoocompiler.passes.analysis.costs import CostPass
from zoocompiler.passes.analysis.cut_points import CutPointPass
from zoocompiler.passes.analysis.shapes import ShapePass
from zoocompiler.passes.analysis.unit_groups import UnitGroupPass
from zoocompiler.passes.analysis.values import SharedValues
from zoocompiler.tracing import trace_graph

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # name -> (source, builder of the model for an input size)
    "resnet50": "torchvision",
    "mobilenet_v3_large": "torchvision",
    "vit_small": "timm",
    "convnext_tiny": "torchvision",
}
TARGET = 2.0  # zoocompiler's time ≤ TARGET × Torch-Pruning's
STAGES = ("fx trace", "shared run", "shapes", "costs", "cut points", "unit groups")


def build(name: str, size: int) -> nn.Module:
    """The model in eval mode with random weights (seed 0); timm's ViT is built for ``size`` (``img_size``)."""
    torch.manual_seed(0)
    if name == "vit_small":
        import timm

        return timm.create_model("vit_small_patch16_224", img_size=size).eval()
    import torchvision

    return getattr(torchvision.models, name)().eval()


def median_s(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_times(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds of each stage of one ``trace`` (the same calls, timed one by one, garbage collection paused)."""
    times: dict[str, float] = {}

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        times[stage] = time.perf_counter() - start
        return out

    with gc_paused():
        gm = timed("fx trace", lambda: trace_graph(model, x, check_first=False))
        shared = SharedValues()
        timed("shared run", lambda: shared.get(gm))
        for stage, analysis_pass in zip(
            STAGES[2:], (ShapePass(shared), CostPass(shared), CutPointPass(), UnitGroupPass(shared=shared))
        ):
            timed(stage, lambda p=analysis_pass: p(gm))
    return times


def digest(gm: Any) -> str:
    """sha256 of the analysis results: cut points, unit groups (members, pins, reasons), per-node annotations."""
    info = graph_info(gm)
    nodes = []
    for n in gm.graph.nodes:
        ni = node_info(n)
        nodes.append([n.name, ni.value_kind, repr(ni.tensor), repr(ni.cost), ni.cut_index, repr(ni.shape_value),
                      repr(ni.shape_value_alt_batch), ni.unit_dim, ni.unit_groups])
    doc = {"cuts": info.cut_points, "groups": [dataclasses.asdict(g) for g in info.unit_groups], "nodes": nodes}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def bench_case(name: str, size: int, runs: int, warmup: int) -> dict[str, Any]:
    import torch_pruning as tp

    model = build(name, size)
    x = torch.randn(1, 3, size, size)

    def ours() -> Any:
        return trace(model, x)

    def theirs() -> Any:
        return tp.DependencyGraph().build_dependency(model, example_inputs=x)

    for _ in range(warmup):
        ours()
        theirs()
    zc_times, tp_times = [], []
    for _ in range(runs):  # alternated: load from other processes hits both alike
        zc_times.append(median_s(ours, 1))
        tp_times.append(median_s(theirs, 1))
    stages = [stage_times(model, x) for _ in range(runs)]
    gm = ours()
    info = graph_info(gm)
    return {
        "model": name,
        "size": size,
        "zoocompiler_s": statistics.median(zc_times),
        "torch_pruning_s": statistics.median(tp_times),
        "stages_s": {s: statistics.median(t[s] for t in stages) for s in STAGES},
        "nodes": len(gm.graph.nodes),
        "cut_points": len(info.cut_points),
        "unit_groups": len(info.unit_groups),
        "prunable_groups": sum(g.prunable for g in info.unit_groups),
        "digest": digest(gm),
    }


def derived(doc: dict[str, Any]) -> dict[str, Any]:
    """Ratio and target verdict per row (recomputed on ``--render-only``)."""
    for row in doc["rows"]:
        row["ratio"] = row["zoocompiler_s"] / row["torch_pruning_s"]
        row["target_met"] = row["ratio"] <= TARGET
    return {"target": f"zoocompiler trace ≤ {TARGET:g}× Torch-Pruning build_dependency",
            "all_met": all(r["target_met"] for r in doc["rows"])}


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    import torch_pruning as tp

    torch.set_num_threads(1)
    rows = []
    for size in args.sizes:
        for name in args.models:
            console.log(f"{name} at {size} px")
            rows.append(bench_case(name, size, args.runs, args.warmup))
    return {"setup": {"threads": torch.get_num_threads(), "batch": 1, "runs": args.runs, "warmup": args.warmup,
                      "torch_pruning": getattr(tp, "__version__", "unknown")}, "rows": rows}


def render(doc: dict[str, Any], console: Console) -> None:
    t = Table(title=f"analysis time, 1 thread, batch 1 (median of {doc['setup']['runs']}); target: {doc['target']}")
    for col in ("model", "px", "zoocompiler s", "Torch-Pruning s", "ratio", "target"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in doc["rows"]:
        t.add_row(r["model"], str(r["size"]), f"{r['zoocompiler_s']:.3f}", f"{r['torch_pruning_s']:.3f}",
                  f"{r['ratio']:.2f}×", "met" if r["target_met"] else "MISSED")
    console.print(t)
    t = Table(title="zoocompiler stages (s; median per stage) and results")
    for col in ("model", "px", *STAGES, "nodes", "cuts", "groups (prunable)", "digest"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in doc["rows"]:
        t.add_row(r["model"], str(r["size"]), *[f"{r['stages_s'][s]:.3f}" for s in STAGES], str(r["nodes"]),
                  str(r["cut_points"]), f"{r['unit_groups']} ({r['prunable_groups']})", r["digest"])
    console.print(t)


def plot(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.2))
    xs = range(len(rows))
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        vals = [r["stages_s"][stage] for r in rows]
        ax.bar([x - 0.2 for x in xs], vals, 0.4, bottom=bottom, label=f"zoocompiler: {stage}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.bar([x + 0.2 for x in xs], [r["torch_pruning_s"] for r in rows], 0.4, color="k", label="Torch-Pruning")
    ax.scatter([x - 0.2 for x in xs], [TARGET * r["torch_pruning_s"] for r in rows], marker="_", s=400, color="r",
               label=f"target ({TARGET:g}× Torch-Pruning)", zorder=3)
    ax.set_xticks(list(xs), [f"{r['model']}\n{r['size']} px" for r in rows], fontsize=7)
    ax.set_ylabel("seconds (1 thread)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS),
                        help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[224, 64])
    parser.add_argument("--runs", type=int, default=7, help="timed calls per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--quick", action="store_true", help="resnet50 + mobilenet_v3_large at 64 px, 3 runs")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "analysis_speed.json")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; use some of: {', '.join(MODELS)}")
    console = Console(width=160)
    if args.render_only:
        doc = rederived(args.out, derived)
    else:
        if args.quick:
            args.models, args.sizes, args.runs, args.warmup = ["resnet50", "mobilenet_v3_large"], [64], 3, 1
        doc = run_measured(args, console, run, derived)
    show(doc, args, console, render, plot, measured=not args.render_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
