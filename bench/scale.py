"""Scaling benchmark (issue 18): DeRy's analysis on zoos of 10, 30 and 100 generated models, in-process and on
Ray with 1 and 2 workers, wall time and speed-up per stage; the Ray overhead per task; a projection to 1,000
models on a 16-node cluster from the measured per-item costs.

Usage::

    python bench/scale.py                   # full run (sizes 10, 30, 100; 4 executors; see docs/bench_scale.md)
    python bench/scale.py --quick           # smoke: sizes 4 and 8, few restarts, every executor (~1-2 min)
    python bench/scale.py --quick --executors local1,local   # in-process only (no Ray), under a minute
    python bench/scale.py --render-only [--markdown]   # re-print the tables (and redraw the plot) from the JSON

**Zoo.** ``--sizes`` zoos of generated CNNs on 1×28×28 (``generated_specs``): 2-5 conv → BatchNorm → ReLU
layers (max-pool after every second one), width 8-24 doubling every two layers, kernel 3 or 5, global average
pool, a 10-way linear head; architecture drawn from ``RandomState(seed)``, weights from ``torch.manual_seed``
of the model's own seed, so a zoo of 30 is the zoo of 10 plus 20 models and every run builds the same weights.
**Task**: ``mnist5k`` through the assemble task loader (``load_task``, ``--train-size`` 1000: 800 fit / 200
val), probe ``probe_batch(fit, minimum=--probe)`` (256 images).

**Stages** (each timed; the per-member ones are items of the executor):

* ``load`` *(per member)*: build + ``passes.analysis.trace`` + ``assembly_positions``, as ``load_member`` does
  (``load_generated``), one item per model;
* ``grams`` *(per member)* and ``cka`` (driver): ``zoo_similarity`` (``cache_dir=None``): each model's packed
  position Grams on the probe are one item (the executor's ``map``, timed by ``TimedExecutor``), then the CKA of
  all position pairs on the driver (the rest of the call);
* ``partition`` (driver): ``partition_members`` (K=4, eps 0.2, ``--restarts``, distinct sets, as assemble);
* ``probe_zoo`` *(per member)*: ``member_probes`` (each model's linear probe on the task: the ILP's quality);
* ``ilp_build`` (driver): ``assembly_options`` (every block, every stage-k → k+1 join with its stitch cost and
  CKA, every head), and ``ilp_solve`` (driver): ``solve_assemblies`` (PuLP/CBC, top ``--top``, params ≤ the zoo's
  median model);
* ``rerank`` *(per candidate)*: ``rank_candidates`` (each ILP candidate built with LS stitches and scored).

**Executors** (``--executors``): ``local1`` = ``LocalExecutor`` with torch and BLAS at 1 thread (what each Ray
task gets: Ray sets 1 thread per task worker), ``local`` = ``LocalExecutor`` with the default threads (all
cores), ``ray1``/``ray2`` = ``RayExecutor`` on a fresh local Ray instance (``ray.init(num_cpus=k, ...)``,
``ray.shutdown()`` after), warmed up first (workers started, torch and zoocompiler imported; the warm-up time is
recorded, not counted in the stages). Driver-side stages run on the driver with the default threads in the Ray
runs. Speed-ups are against ``local1`` (the fair comparison of task parallelism) and ``local``; the target
(issue 18): ≥ 1.7× at 2 workers over ``local1`` on the 100-model zoo for every per-member stage. Results are
compared with the first executor's: similarity max |Δ| ≤ 1e-6, same partition, same ILP assemblies, same
candidate ranking (probe scores ≤ 1e-6).

**Overhead** (per Ray run): no-op tasks through ``RayExecutor.map`` (sealing and sha256 checks included) and
echo tasks with payloads of 0.25-4 MB (per-byte cost, item and result); the sealed sizes of each stage's
function, first item and first result as the Ray run sends them, and the seconds to seal and unseal each (left
out of the stage timings). ``derive`` turns these into the **projection** to ``--project-models`` models on
``--nodes`` × ``--cores-per-node`` (``projection`` states the model; docs/bench_scale.md and docs/scale.md).
Writes ``bench/results/scale.json`` and ``bench/results/scale.png`` atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from _measured import (  # bench/_measured.py (this script's folder is on sys.path)
    markdown_table,
    rederived,
    rich_table,
    run_measured,
    show,
)
from rich.console import Console

from zoocompiler.core.atomic import atomic_path
from zoocompiler.core.budget import Budget

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (10, 30, 100)
QUICK_SIZES = (4, 8)
EXECUTORS = ("local1", "local", "ray1", "ray2")
EXECUTOR_LABEL = {"local1": "local, 1 thread", "local": "local, default threads", "ray1": "ray, 1 worker",
                  "ray2": "ray, 2 workers"}
STAGES = ("load", "grams", "cka", "partition", "probe_zoo", "ilp_build", "ilp_solve", "rerank")
PER_MEMBER = ("load", "grams", "probe_zoo")  # items of the executor, one per zoo model
MAPPED = (*PER_MEMBER, "rerank")  # stages whose work is the executor's map
DRIVER = ("cka", "partition", "ilp_build", "ilp_solve")  # stages that run on the driver only
QUADRATIC = ("cka", "ilp_build")  # work ∝ N²: every pair of positions; every join of consecutive-stage blocks
TARGET_SPEEDUP = 1.7  # ray2 over local1, per-member stages, largest zoo
SIM_TOL = 1e-6
DATA = "mnist5k"
INPUT_SHAPE = (1, 28, 28)
K = 4
NOOP_TASKS = 200
PAYLOAD_MB = (0.25, 1.0, 4.0)
PAYLOAD_TASKS = 12
Log = Callable[[str], None]


# ----------------------------------------------------------------------------- the generated zoo


@dataclass(frozen=True)
class GeneratedSpec:
    """One generated CNN: ``depth`` conv layers of base ``width`` (doubling every two), ``kernel``, weights from
    ``seed``."""

    name: str
    depth: int
    width: int
    kernel: int
    seed: int

    @property
    def text(self) -> str:
        return f"generated:cnn,depth={self.depth},width={self.width},kernel={self.kernel},seed={self.seed}"


def generated_specs(count: int, seed: int = 0) -> list[GeneratedSpec]:
    """The first ``count`` models of the generated zoo (a zoo of n is a prefix of a zoo of m > n)."""
    specs = []
    for i in range(count):
        rng = np.random.RandomState(seed * 100_003 + i)
        depth, width, kernel = int(rng.randint(2, 6)), int(rng.choice([8, 12, 16, 24])), int(rng.choice([3, 5]))
        specs.append(GeneratedSpec(f"cnn{i:04d}_d{depth}w{width}k{kernel}", depth, width, kernel, seed * 100_003 + i))
    return specs


def build_generated(spec: GeneratedSpec) -> nn.Module:
    """The CNN of ``spec`` (plain ``nn.Sequential`` of torch layers), eval mode, weights seeded by ``spec.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        layers: list[nn.Module] = []
        channels = INPUT_SHAPE[0]
        for d in range(spec.depth):
            out = spec.width * 2 ** (d // 2)
            layers += [nn.Conv2d(channels, out, spec.kernel, padding=spec.kernel // 2, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU()]
            if d % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
        return nn.Sequential(*layers).eval()


def load_generated(spec: GeneratedSpec):
    """``spec`` built, traced and annotated as ``load_member`` does a zoo spec: the per-member load item."""
    from zoocompiler.passes.analysis import trace
    from zoocompiler.passes.analysis.activations import assembly_positions
    from zoocompiler.pipelines.zoo.members import TRACE_BATCH, ZooMember

    model = build_generated(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        example = torch.randn(TRACE_BATCH, *INPUT_SHAPE)
    graph = trace(model, example)
    return ZooMember(spec.name, spec.text, model, graph, assembly_positions(graph), INPUT_SHAPE)


# ----------------------------------------------------------------------------- executors, timed


class TimedExecutor:
    """An executor that records each ``map`` call (wall seconds, items) and, with ``sizes``, the sealed bytes of
    the function, of an item and of a result (the first of each call) and the seconds to seal and unseal each
    here (the time that takes is ``sizing_s``, which the stage timings leave out)."""

    def __init__(self, inner, sizes: bool = False):
        self.inner, self.sizes = inner, sizes
        self.remote = inner.remote
        self.calls: list[dict[str, Any]] = []

    def map(self, fn, items):
        items = list(items)
        start = time.perf_counter()
        out = self.inner.map(fn, items)
        call = {"seconds": time.perf_counter() - start, "items": len(items)}
        if self.sizes and items:
            from zoocompiler.pipelines.transport import seal, unseal

            start = time.perf_counter()
            call.update(bytes={}, seal_s={}, unseal_s={})
            for key, obj in (("fn", fn), ("item", items[0]), ("result", out[0])):
                t0 = time.perf_counter()
                sealed = seal(obj)
                t1 = time.perf_counter()
                unseal(sealed, key)
                call["bytes"][key] = len(sealed.blob)
                call["seal_s"][key], call["unseal_s"][key] = t1 - t0, time.perf_counter() - t1
            call["sizing_s"] = time.perf_counter() - start
        self.calls.append(call)
        return out

    def map_writing(self, fn, items, folder):
        return self.inner.map_writing(fn, items, folder)

    def at_target(self, fn, *args):
        return self.inner.at_target(fn, *args)

    def take(self) -> dict[str, Any]:
        """The map calls since the last ``take``, summed (one stage may map once)."""
        calls, self.calls = self.calls, []
        out = {"seconds": sum(c["seconds"] for c in calls), "items": sum(c["items"] for c in calls),
               "sizing_s": sum(c.get("sizing_s", 0.0) for c in calls)}
        if calls and "bytes" in calls[0]:
            out.update({k: calls[0][k] for k in ("bytes", "seal_s", "unseal_s")})
        return out


def _warm():
    def warm(i: int) -> tuple[int, int]:
        """Imports and a first trace (one-time costs), paid before anything is timed."""
        import zoocompiler.pipelines.assemble.pipeline  # noqa: F401 - the imports every stage needs

        load_generated(generated_specs(1)[0])
        return os.getpid(), torch.get_num_threads()

    return warm


def _echo():
    return lambda x: x


def ray_overhead(executor, workers: int, log: Log) -> dict[str, Any]:
    """No-op tasks and echo tasks with payloads through ``executor.map`` (per task: seal, object store, sha256)."""
    start = time.perf_counter()
    executor.map(_echo(), range(NOOP_TASKS))
    noop = (time.perf_counter() - start) / NOOP_TASKS
    rows = []
    for mb in PAYLOAD_MB:
        payload = [np.random.default_rng(i).bytes(int(mb * 2**20)) for i in range(PAYLOAD_TASKS)]
        start = time.perf_counter()
        executor.map(_echo(), payload)
        rows.append({"mb": mb, "per_task_s": (time.perf_counter() - start) / PAYLOAD_TASKS})
    x, y = np.array([r["mb"] for r in rows]) * 2**20, np.array([r["per_task_s"] for r in rows])
    slope = float(np.polyfit(x, y, 1)[0])  # seconds per byte carried both ways (item out, result back)
    log(f"ray ×{workers}: no-op task {1e3 * noop:.2f} ms, payload {1e3 * slope * 2**20:.2f} ms/MB round trip")
    return {"noop_tasks": NOOP_TASKS, "noop_per_task_s": noop, "payload": rows, "per_byte_round_trip_s": slope}


def seal_costs() -> dict[str, float]:
    """Seconds per byte to seal (pickle + sha256) and unseal (sha256 + unpickle) a 32 MB payload here."""
    from zoocompiler.pipelines.transport import seal, unseal

    blob = np.random.default_rng(0).bytes(32 * 2**20)
    start = time.perf_counter()
    sealed = seal(blob)
    middle = time.perf_counter()
    unseal(sealed, "payload")
    end = time.perf_counter()
    return {"seal_per_byte_s": (middle - start) / len(blob), "unseal_per_byte_s": (end - middle) / len(blob)}


# ----------------------------------------------------------------------------- the stages


@dataclass
class Shared:
    """What every run of every size shares: the task and the probe images."""

    task: Any
    probe: torch.Tensor


def shared_inputs(args: argparse.Namespace) -> Shared:
    from zoocompiler.pipelines.assemble.task import load_task
    from zoocompiler.pipelines.zoo.similarity import probe_batch

    task = load_task(DATA, train_size=args.train_size, val_fraction=0.2)
    return Shared(task, probe_batch(task.fit, 0.05, minimum=args.probe, seed=0))


def run_zoo(specs: list[GeneratedSpec], shared: Shared, executor: TimedExecutor, args: argparse.Namespace,
            log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every stage on the zoo ``specs``: (timings and per-stage details, results to compare across executors)."""
    from zoocompiler.passes.rewrite.compose import ProbeActivations
    from zoocompiler.pipelines.assemble.config import AssembleConfig
    from zoocompiler.pipelines.assemble.pipeline import ZooAnalysis, member_probes, rank_candidates
    from zoocompiler.pipelines.assemble.problem import assembly_options, partition_members
    from zoocompiler.pipelines.zoo.similarity import zoo_similarity
    from zoocompiler.solvers.assembly_ilp import solve_assemblies

    seconds: dict[str, float] = {}
    maps: dict[str, dict[str, Any]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        maps[name] = executor.take()
        seconds[name] = time.perf_counter() - start - maps[name].pop("sizing_s")
        return out

    members = timed("load", lambda: executor.map(load_generated, specs))
    positions = sum(len(m.positions) for m in members)
    sim = timed("similarity", lambda: zoo_similarity(
        {m.name: m.graph for m in members}, shared.probe, pool="auto", cache_dir=None, data_key="bench-scale",
        executor=executor))
    seconds["grams"] = maps["similarity"]["seconds"]
    seconds["cka"] = seconds.pop("similarity") - seconds["grams"]
    maps["grams"] = maps.pop("similarity")
    partition = timed("partition", lambda: partition_members(
        members, sim, k=K, eps=0.2, restarts=args.restarts, seed=0, distinct=True))
    analysis = ZooAnalysis(shared.task, members, shared.probe, sim, partition)
    probes = ProbeActivations(analysis.members_by_name, shared.probe)
    quality = timed("probe_zoo", lambda: member_probes(analysis, probes, executor))
    budget = Budget(params=float(np.median([sum(p.numel() for p in m.module.parameters()) for m in members])))
    results: dict[str, Any] = {"similarity": sim.matrix, "partition": (partition.boundaries, partition.sets),
                               "quality": [quality[m.name] for m in members]}
    details: dict[str, Any] = {"models": len(members), "positions": positions, "budget_params": budget.params}
    if len(members) <= args.ilp_max_models:
        opts = timed("ilp_build", lambda: assembly_options(partition, members, sim, shared.task.num_classes,
                                                           quality=quality))
        assemblies, stats = timed("ilp_solve", lambda: solve_assemblies(
            opts.options, opts.joins, opts.heads, budget, top=args.top, forbidden=opts.forbidden))
        details["ilp"] = {"blocks": len(opts.options), "joins": len(opts.joins), "variables": stats.variables,
                          "constraints": stats.constraints, "assemblies": len(assemblies), "status": stats.status}
        config = AssembleConfig(budget=budget, proxy="probe", top=args.top, seed=0)
        ranked = timed("rerank", lambda: rank_candidates(analysis, opts, assemblies, config, probes, executor))
        results["ilp"] = [a.blocks for a in assemblies]
        results["rerank"] = [(c.key, c.probe) for c in ranked]
    else:
        details["ilp"] = {"skipped": f"more than --ilp-max-models {args.ilp_max_models} models"}
    log(f"  {len(members)} models ({positions} positions): "
        + ", ".join(f"{s} {seconds[s]:.2f} s" for s in STAGES if s in seconds))
    details["maps"] = maps
    return {"seconds": seconds, **details}, results


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """How ``got`` differs from the reference run's results (same zoo)."""
    out = {"similarity_max_abs_diff": float(np.max(np.abs(ref["similarity"] - got["similarity"]))),
           "same_partition": ref["partition"] == got["partition"],
           "quality_max_abs_diff": float(np.max(np.abs(np.array(ref["quality"]) - np.array(got["quality"]))))}
    if "ilp" in ref and "ilp" in got:
        out["same_ilp"] = ref["ilp"] == got["ilp"]
        out["same_ranking"] = [k for k, _ in ref["rerank"]] == [k for k, _ in got["rerank"]]
        out["rerank_max_abs_diff"] = max((abs(a[1] - b[1]) for a, b in zip(ref["rerank"], got["rerank"])),
                                         default=0.0)
    out["agree"] = (out["similarity_max_abs_diff"] <= SIM_TOL and out["same_partition"]
                    and out["quality_max_abs_diff"] <= SIM_TOL and out.get("same_ilp", True)
                    and out.get("same_ranking", True) and out.get("rerank_max_abs_diff", 0.0) <= SIM_TOL)
    return out


# ----------------------------------------------------------------------------- one executor, every size


class _Threads:
    """torch and BLAS thread counts for a local run (None: leave the defaults)."""

    def __init__(self, threads: int | None):
        self.threads = threads

    def __enter__(self):
        from threadpoolctl import threadpool_limits

        self.torch = torch.get_num_threads()
        self.limit = threadpool_limits(self.threads) if self.threads else None
        if self.threads:
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.torch)
        if self.limit is not None:
            self.limit.restore_original_limits()


def run_executor(name: str, sizes: list[int], shared: Shared, args: argparse.Namespace, log: Log,
                 reference: dict[int, dict]) -> dict[str, Any]:
    """Every zoo size under executor ``name``; fills ``reference`` on the first executor, compares after."""
    from zoocompiler.pipelines.base import LocalExecutor

    row: dict[str, Any] = {"executor": name, "label": EXECUTOR_LABEL[name], "zoos": {}}
    ray = None
    if name.startswith("ray"):
        import ray

        from zoocompiler.pipelines.executors import RayExecutor

        workers = int(name[3:])
        if ray.is_initialized():
            ray.shutdown()
        start = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        inner = RayExecutor(num_cpus=workers)
        warm = inner.map(_warm(), range(4 * workers))
        row.update(workers=workers, start_s=time.perf_counter() - start,
                   worker_threads=sorted({t for _, t in warm}), worker_processes=len({p for p, _ in warm}))
        log(f"{name}: Ray up and warm in {row['start_s']:.1f} s ({row['worker_processes']} worker processes, "
            f"torch threads {row['worker_threads']})")
        row["overhead"] = ray_overhead(inner, workers, log)
    else:
        inner = LocalExecutor()
        inner.map(_warm(), range(1))
    threads = 1 if name == "local1" else None
    try:
        with _Threads(threads):
            row["driver_threads"] = torch.get_num_threads()
            for size in sizes:
                timed = TimedExecutor(inner, sizes=ray is not None)
                log(f"{name}: zoo of {size}")
                measured, results = run_zoo(generated_specs(size), shared, timed, args, log)
                if size not in reference:
                    reference[size] = results
                    measured["agreement"] = {"reference": True}
                else:
                    measured["agreement"] = compare(reference[size], results)
                row["zoos"][str(size)] = measured
    finally:
        if ray is not None:
            ray.shutdown()
    return row


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    def log(text: str) -> None:
        console.log(text)

    _pickle_by_value()
    load = os.getloadavg()[0]
    shared = shared_inputs(args)
    reference: dict[int, dict] = {}
    runs = [run_executor(name, args.sizes, shared, args, log, reference) for name in args.executors]
    setup = {"sizes": args.sizes, "executors": args.executors, "data": DATA, "probe": int(len(shared.probe)),
             "task": shared.task.sizes(), "k": K, "restarts": args.restarts, "top": args.top,
             "ilp_max_models": args.ilp_max_models, "default_threads": torch.get_num_threads(),
             "cores": os.cpu_count(), "load_average_start": round(load, 2),
             "load_average_end": round(os.getloadavg()[0], 2), "ray": _ray_version(),
             "projection": {"models": args.project_models, "nodes": args.nodes,
                            "cores_per_node": args.cores_per_node, "bandwidth_gbit": args.bandwidth_gbit}}
    return {"setup": setup, "runs": runs, "seal": seal_costs()}


def _ray_version() -> str | None:
    try:
        import ray
    except ImportError:
        return None
    return ray.__version__


def _pickle_by_value() -> None:
    """This script's functions and classes travel by value to Ray workers even when it is imported as a module
    (workers cannot import bench/)."""
    module = sys.modules[__name__]
    if __name__ != "__main__":
        try:
            from ray import cloudpickle
        except ImportError:
            return
        cloudpickle.register_pickle_by_value(module)


# ----------------------------------------------------------------------------- derived figures


def _run(doc: dict, name: str) -> dict | None:
    return next((r for r in doc["runs"] if r["executor"] == name), None)


def speedups(doc: dict) -> list[dict[str, Any]]:
    """Per zoo size, stage and executor: wall seconds and the speed-up over ``local1`` and over ``local``."""
    rows = []
    base1, base = _run(doc, "local1"), _run(doc, "local")
    for size in map(str, doc["setup"]["sizes"]):
        for stage in STAGES:
            for r in doc["runs"]:
                s = r["zoos"].get(size, {}).get("seconds", {}).get(stage)
                if s is None:
                    continue
                row = {"size": int(size), "stage": stage, "executor": r["executor"], "seconds": s}
                for key, b in (("vs_local1", base1), ("vs_local", base)):
                    ref = None if b is None else b["zoos"].get(size, {}).get("seconds", {}).get(stage)
                    row[key] = None if not ref or not s else ref / s
                rows.append(row)
    return rows


def targets(doc: dict, rows: list[dict]) -> list[dict[str, Any]]:
    """Issue 18: ray ×2 over local ×1 ≥ 1.7 for each per-member stage on the largest zoo measured."""
    size = max(doc["setup"]["sizes"])
    out = []
    for stage in PER_MEMBER:
        row = next((r for r in rows if r["size"] == size and r["stage"] == stage and r["executor"] == "ray2"), None)
        value = None if row is None else row["vs_local1"]
        out.append({"target": f"{stage}: ray ×2 / local ×1 ≥ {TARGET_SPEEDUP}", "size": size, "value": value,
                    "met": None if value is None else value >= TARGET_SPEEDUP})
    return out


def agreement(doc: dict) -> list[dict[str, Any]]:
    return [{"executor": r["executor"], "size": int(size), **z["agreement"]}
            for r in doc["runs"] for size, z in r["zoos"].items()
            if "agreement" in z and not z["agreement"].get("reference")]


def _fit_linear(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of y = a + b·x by least squares (b = 0 with one point)."""
    if len(xs) == 1:
        return ys[0], 0.0
    b, a = np.polyfit(np.array(xs, float), np.array(ys, float), 1)
    return float(a), float(b)


def _power(xs: list[float], ys: list[float]) -> float:
    """Exponent of y ∝ x^α, least squares in log-log over every size (1 with one point)."""
    if len(xs) < 2 or min(ys) <= 0:
        return 1.0
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def projection(doc: dict) -> dict[str, Any]:
    """Projected wall time per stage for ``models`` models: one process at 1 thread vs ``nodes`` × ``cores``.

    Mapped stages: T = ceil(N/S)·w + N·d + (N·(i + r) + nodes·fn)/B, an upper bound (the driver's share d and the
    workers' share w are added, not overlapped). Per task, on a worker, w = c + unseal(fn) + unseal(item) +
    seal(result); on the driver, d = o + seal(item) + unseal(result) + (i + r)·γ. c: measured seconds per item
    (local ×1, largest zoo); i, r, fn: sealed bytes of an item, a result and the function as the Ray run sent
    them, fitted linear in the zoo size (the function carries zoo-wide data), and the seconds to seal/unseal each
    at the largest zoo's seconds per byte (timed on the driver); o: Ray overhead per no-op task (ray ×2); γ: the
    object store's seconds per byte, what the echo tasks' round-trip cost per byte leaves after two seals and two
    unseals, halved (one transfer); B: the driver's network bandwidth; S: slots (nodes × cores).
    Driver stages (``DRIVER``): the largest zoo's time (local ×1) scaled by (N/n)^α, α fitted over every zoo
    size (log-log least squares), or 2 where the work is quadratic by construction (``QUADRATIC``: the CKA's P²
    Gram products, the ILP build's joins of every block with every block of the next stage); on the cluster
    the CKA is divided by the cores per node (one matrix product: BLAS uses the driver's cores, assumed at linear
    speed-up), the others run as measured (single-threaded solvers).
    """
    setup = doc["setup"]
    p = setup["projection"]
    base, sized = _run(doc, "local1"), _sized_run(doc)
    if base is None or sized is None:
        return {"skipped": "needs the local1 run and a Ray run"}
    n_models, slots, nodes = p["models"], p["nodes"] * p["cores_per_node"], p["nodes"]
    bandwidth = p["bandwidth_gbit"] * 1e9 / 8
    overhead, seal = sized["overhead"], doc["seal"]
    o = overhead["noop_per_task_s"]
    gamma = max(0.0, overhead["per_byte_round_trip_s"] - 2 * (seal["seal_per_byte_s"] + seal["unseal_per_byte_s"])) / 2
    sizes = sorted(int(s) for s in base["zoos"])
    zoo = base["zoos"][str(sizes[-1])]
    rows = []
    for stage in MAPPED:
        m = zoo["maps"].get(stage)
        have = [s for s in sizes if "bytes" in sized["zoos"].get(str(s), {}).get("maps", {}).get(stage, {})]
        if not m or not m["items"] or not have:
            continue
        c = m["seconds"] / m["items"]
        items = n_models if stage in PER_MEMBER else m["items"]

        largest = sized["zoos"][str(have[-1])]["maps"][stage]

        def size(key: str, stage=stage, have=have) -> float:
            a, b = _fit_linear(have, [sized["zoos"][str(s)]["maps"][stage]["bytes"][key] for s in have])
            return max(0.0, a + b * (n_models if stage in PER_MEMBER or key == "fn" else have[-1]))

        def cost(kind: str, key: str, largest=largest) -> float:  # seconds, at the largest zoo's seconds per byte
            return size(key) * largest[kind][key] / max(1, largest["bytes"][key])

        fn, carried = size("fn"), size("item") + size("result")
        worker = c + cost("unseal_s", "fn") + cost("unseal_s", "item") + cost("seal_s", "result")
        driver = o + cost("seal_s", "item") + cost("unseal_s", "result") + carried * gamma
        network = (items * carried + nodes * fn) / bandwidth
        rows.append({"stage": stage, "kind": "per member" if stage in PER_MEMBER else "per candidate",
                     "per_item_s": c, "items": items, "fn_bytes": fn, "item_result_bytes": carried,
                     "worker_per_task_s": worker, "driver_per_task_s": driver, "network_s": network,
                     "local_s": items * c, "cluster_s": math.ceil(items / slots) * worker + items * driver + network})
    for stage in DRIVER:
        have = [s for s in sizes if stage in base["zoos"][str(s)]["seconds"]]
        if not have:
            rows.append({"stage": stage, "kind": "driver", "skipped": "not measured"})
            continue
        ys = [base["zoos"][str(s)]["seconds"][stage] for s in have]
        alpha = 2.0 if stage in QUADRATIC else _power(have, ys)
        scale = (n_models / have[-1]) ** alpha
        blas = p["cores_per_node"] if stage == "cka" else 1.0
        rows.append({"stage": stage, "kind": "driver", "alpha": alpha, "items": 1, "measured_at": have[-1],
                     "local_s": ys[-1] * scale, "cluster_s": ys[-1] * scale / blas, "driver_speedup": blas})
    total_local = sum(r.get("local_s", 0.0) for r in rows)
    total_cluster = sum(r.get("cluster_s", 0.0) for r in rows)
    parts = {kind: {side: sum(r.get(f"{side}_s", 0.0) for r in rows if (r["kind"] == "driver") == (kind == "driver"))
                    for side in ("local", "cluster")} for kind in ("mapped", "driver")}
    return {"parts": parts, "models": n_models, "nodes": nodes, "cores_per_node": p["cores_per_node"], "slots": slots,
            "bandwidth_gbit": p["bandwidth_gbit"], "noop_per_task_s": o, "store_per_byte_s": gamma,
            "positions": round(zoo["positions"] / zoo["models"] * n_models), "rows": rows,
            "total_local_s": total_local, "total_cluster_s": total_cluster}


def derive(doc: dict) -> dict[str, Any]:
    rows = speedups(doc)
    return {"speedups": rows, "targets": targets(doc, rows), "agreement": agreement(doc),
            "projection": projection(doc)}


# ----------------------------------------------------------------------------- tables and plot


def _s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def wall_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    names = [r["executor"] for r in doc["runs"]]
    header = ["models", "stage", *[f"{n} s" for n in names],
              *[f"{n} / local1" for n in names if n != "local1" and _run(doc, "local1")]]
    cells = []
    by = {(r["size"], r["stage"], r["executor"]): r for r in doc["speedups"]}
    for size in doc["setup"]["sizes"]:
        for stage in STAGES:
            got = [by.get((size, stage, n)) for n in names]
            if not any(got):
                continue
            cells.append([str(size), stage + (" *" if stage in PER_MEMBER else ""),
                          *[_s(g["seconds"]) if g else "-" for g in got],
                          *[_x(g["vs_local1"]) if g else "-" for n, g in zip(names, got)
                            if n != "local1" and _run(doc, "local1")]])
    return header, cells


def target_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = ["target", "models", "value", "verdict"]
    return header, [[t["target"], str(t["size"]), _x(t["value"]),
                     "-" if t["met"] is None else "met" if t["met"] else "missed"] for t in doc["targets"]]


def agreement_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    ref = doc["runs"][0]["executor"] if doc["runs"] else "-"
    header = ["executor", "models", f"similarity max abs Δ vs {ref}", "same partition", "probe_zoo max abs Δ",
              "same ILP choice", "same ranking", "agree"]
    cells = [[a["executor"], str(a["size"]), f"{a['similarity_max_abs_diff']:.1e}", _yes(a["same_partition"]),
              f"{a['quality_max_abs_diff']:.1e}", _yes(a.get("same_ilp")), _yes(a.get("same_ranking")),
              _yes(a["agree"])] for a in doc["agreement"]]
    return header, cells


def _kb(n: float) -> str:
    return f"{n / 1024:.1f}" if n < 10 * 1024 else f"{n / 1024:,.0f}"


def _yes(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "NO"


def overhead_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = ["executor", "start + warm-up s", "worker threads", "no-op task ms",
              *[f"{mb:g} MB echo ms" for mb in PAYLOAD_MB], "ms per MB round trip"]
    cells = []
    for r in doc["runs"]:
        o = r.get("overhead")
        if not o:
            continue
        cells.append([r["executor"], f"{r['start_s']:.1f}", ",".join(map(str, r["worker_threads"])),
                      f"{1e3 * o['noop_per_task_s']:.2f}", *[f"{1e3 * p['per_task_s']:.1f}" for p in o["payload"]],
                      f"{1e3 * o['per_byte_round_trip_s'] * 2**20:.2f}"])
    return header, cells


def _sized_run(doc: dict) -> dict | None:
    """The Ray run whose sealed payload sizes and overhead the projection uses (ray ×2, else ray ×1)."""
    return _run(doc, "ray2") or _run(doc, "ray1")


def cost_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Per-item costs (local ×1) and sealed sizes (as sent by the Ray run) of the mapped stages, per zoo size."""
    base, sized = _run(doc, "local1"), _sized_run(doc)
    header = ["models", "stage", "items", "s per item", "fn KB", "item KB", "result KB"]
    cells = []
    if base is None:
        return header, cells
    for size, z in base["zoos"].items():
        for stage in MAPPED:
            m = z["maps"].get(stage)
            if not m or not m["items"]:
                continue
            b = {} if sized is None else sized["zoos"].get(size, {}).get("maps", {}).get(stage, {}).get("bytes", {})
            cells.append([size, stage, str(m["items"]), f"{m['seconds'] / m['items']:.4f}",
                          *[_kb(b[k]) if k in b else "-" for k in ("fn", "item", "result")]])
    return header, cells


def projection_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    p = doc["projection"]
    header = ["stage", "kind", "per item s (measured)", "items", "fn MB / task", "worker s / task",
              "driver ms / task", "network s", "local s (1 core)", f"{p.get('nodes', '-')} nodes s", "speed-up"]
    cells = []
    for r in p.get("rows", []):
        if "skipped" in r:
            cells.append([r["stage"], r["kind"], "-", "-", "-", "-", "-", "-", r["skipped"], "-", "-"])
            continue
        mapped = "per_item_s" in r
        per = f"{r['per_item_s']:.4f}" if mapped else f"α={r['alpha']:.2f} from {r['measured_at']}"
        cells.append([r["stage"], r["kind"], per, f"{r['items']:,}",
                      f"{r['fn_bytes'] / 2**20:.2f}" if mapped else "-",
                      f"{r['worker_per_task_s']:.3f}" if mapped else "-",
                      f"{1e3 * r['driver_per_task_s']:.2f}" if mapped else "-",
                      f"{r['network_s']:.2f}" if mapped else "-", _s(r["local_s"]),
                      _s(r["cluster_s"]), _x(r["local_s"] / r["cluster_s"] if r["cluster_s"] else None)])
    if "rows" in p:
        for name, part in p["parts"].items():
            cells.append([f"{name} stages", "", "", "", "", "", "", "", _s(part["local"]), _s(part["cluster"]),
                          _x(part["local"] / part["cluster"] if part["cluster"] else None)])
        cells.append(["total", "", "", "", "", "", "", "", _s(p["total_local_s"]), _s(p["total_cluster_s"]),
                      _x(p["total_local_s"] / p["total_cluster_s"])])
    return header, cells


TABLES = (("wall", wall_rows), ("targets", target_rows), ("agreement", agreement_rows),
          ("overhead", overhead_rows), ("costs", cost_rows), ("projection", projection_rows))
TEXT_COLUMNS = ("stage", "executor", "target", "verdict", "kind", "same partition", "same ILP choice",
                "same ranking", "agree", "per item s (measured)")


def titles(doc: dict) -> dict[str, str]:
    s, p = doc["setup"], doc["projection"]
    return {
        "wall": f"wall seconds per stage (* = per member, items of the executor); probe {s['probe']} images, "
                f"K={s['k']}, {s['restarts']} restarts, top {s['top']}; speed-up = local1's time / this",
        "targets": "targets (issue 18)",
        "agreement": f"same results as {doc['runs'][0]['executor'] if doc['runs'] else '-'} (tolerance {SIM_TOL})",
        "overhead": "Ray overhead per task through RayExecutor.map (sealed payloads, sha256 checked)",
        "costs": "per-item cost (local, 1 thread) and sealed payload sizes (as the Ray run sent them) of the mapped "
                 "stages",
        "projection": (f"projection: {p.get('models', '-')} models on {p.get('nodes', '-')} nodes × "
                       f"{p.get('cores_per_node', '-')} cores, {p.get('bandwidth_gbit', '-')} Gbit/s to the driver"
                       if "rows" in p else f"projection: {p.get('skipped')}"),
    }


def render(doc: dict, console: Console) -> None:
    names = titles(doc)
    for name, rows_of in TABLES:
        header, cells = rows_of(doc)
        if not cells:
            continue
        console.print(rich_table(names[name], header, cells, TEXT_COLUMNS))
    if "seconds" in doc:
        console.print(f"measured in {doc['seconds']:.0f} s")


def markdown(doc: dict) -> str:
    names = titles(doc)
    out = []
    for name, rows_of in TABLES:
        header, cells = rows_of(doc)
        if not cells:
            continue
        out += markdown_table(header, cells, TEXT_COLUMNS, names[name])
    return "\n".join(out)


def plot(doc: dict, path: Path) -> None:
    """One panel per zoo size: speed-up over local ×1 per stage and executor (1.7× target line); a last panel
    with the projection (local vs cluster seconds per stage, log scale). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = doc["setup"]["sizes"]
    others = [r["executor"] for r in doc["runs"] if r["executor"] != "local1"]
    proj = doc["projection"].get("rows", [])
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(5.5 * (len(sizes) + 1), 4.8), squeeze=False)
    by = {(r["size"], r["stage"], r["executor"]): r for r in doc["speedups"]}
    width = 0.8 / max(1, len(others))
    for ax, size in zip(axes[0], sizes):
        x = np.arange(len(STAGES))
        for j, name in enumerate(others):
            values = [(by.get((size, s, name)) or {}).get("vs_local1") or np.nan for s in STAGES]
            ax.bar(x + (j - (len(others) - 1) / 2) * width, values, width, label=EXECUTOR_LABEL[name])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGET_SPEEDUP, color="r", ls=":", lw=1, label=f"target {TARGET_SPEEDUP}× (per member, ray ×2)")
        ax.set_xticks(x, [s + ("*" if s in PER_MEMBER else "") for s in STAGES], rotation=30, ha="right")
        top = max([TARGET_SPEEDUP, *[(by.get((size, s, n)) or {}).get("vs_local1") or 0 for s in STAGES
                                     for n in others]])
        ax.set(title=f"{size} models: speed-up over local ×1", ylabel="×", ylim=(0, 1.45 * top))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left")
    ax = axes[0][-1]
    rows = [r for r in proj if "local_s" in r]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["local_s"] for r in rows], 0.4, label="one process, 1 thread")
    ax.bar(x + 0.2, [r["cluster_s"] for r in rows], 0.4, label=f"{doc['projection'].get('nodes')} nodes")
    ax.set_yscale("log")
    ax.set_xticks(x, [r["stage"] for r in rows], rotation=30, ha="right")
    ax.set(title=f"projection: {doc['projection'].get('models')} models", ylabel="seconds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke: sizes {QUICK_SIZES}, 5 restarts, top 3")
    parser.add_argument("--sizes", type=_ints, help=f"zoo sizes (default {','.join(map(str, SIZES))})")
    parser.add_argument("--executors", type=lambda s: s.split(","), default=list(EXECUTORS),
                        help=f"comma-separated, in order (the first is the reference): {','.join(EXECUTORS)}")
    parser.add_argument("--probe", type=int, default=256, help="probe images of the similarity")
    parser.add_argument("--train-size", type=int, default=1000, help="task training rows (fit + val)")
    parser.add_argument("--restarts", type=int, help="partition restarts (default 50; --quick 5)")
    parser.add_argument("--top", type=int, help="ILP assemblies (= candidates re-ranked; default 8, --quick 3)")
    parser.add_argument("--ilp-max-models", type=int, default=100, help="skip ILP and re-rank on larger zoos")
    parser.add_argument("--project-models", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--cores-per-node", type=int, default=16)
    parser.add_argument("--bandwidth-gbit", type=float, default=10.0, help="the driver's network bandwidth")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json", help="JSON results path")
    parser.add_argument("--render-only", action="store_true", help="re-render the tables and plot from --out")
    parser.add_argument("--markdown", action="store_true", help="with --render-only: the tables as markdown")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    args.restarts = args.restarts or (5 if args.quick else 50)
    args.top = args.top or (3 if args.quick else 8)
    unknown = [e for e in args.executors if e not in EXECUTORS]
    if unknown or not args.executors or len(set(args.executors)) != len(args.executors):
        parser.error(f"--executors takes distinct names among {', '.join(EXECUTORS)}")
    if min(args.sizes) < 2:
        parser.error("a zoo needs at least two models")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.render_only:
        doc = rederived(args.out, derive)
        if args.markdown:
            print(markdown(doc))
            return 0
    else:
        doc = run_measured(args, Console(stderr=True), run, derive)
    if args.json:
        plot(doc, args.out.with_suffix(".png"))
        print(json.dumps(doc, indent=1, default=str))
        return 0
    show(doc, args, console, render, plot, measured=not args.render_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
