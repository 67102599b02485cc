"""``pool distill`` (ancestry → pool directory), ``pool finetune`` (Algorithm 1's path sampling),
``pool build`` (every descendant measured, the best one within a budget exported) and ``pool list``.

Every command validates its options, the pool directory and the ancestry before any training; its
output directory appears all or nothing (``finetune`` without ``--out`` replaces the pool in place,
atomically).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoocompiler.core.atomic import check_keeps, check_out_dir
from zoocompiler.core.budget import Budget, human_metric
from zoocompiler.core.cache import weights_hash
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import BudgetError, CheckpointError, DataError, ZooError
from zoocompiler.core.modules import count_macs, count_params
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.exports.deploy import check_deployable, export_deployable, time_report
from zoocompiler.exports.elastic import write_manifest
from zoocompiler.exports.latency import measure_latency
from zoocompiler.training import evaluate, seed_everything

from ..base import Executor, LocalExecutor, Stages, run_staged, write_report
from ..data_parallel import check_workers, run_data_parallel
from .ancestry import VitShape, ancestry_shape, build_vit
from .config import PoolBuildConfig, PoolDistillConfig, PoolFinetuneConfig
from .distill import DistillResult, dense_levels, distill
from .plots import plot_descendants
from .pool import LearngenePool, example_batch, finetune
from .store import POOL_FILE, POOL_FORMAT, read_pool, write_weights

DENSE_LEVELS = 3  # the paper's low, middle and high levels
DESCENDANT_ONNX = "descendant.onnx"
ALL_DIR = "descendants"
PLOT = "descendants.png"
Progress = Callable[[str], None]


def load_ancestry(spec: str, checkpoint: str | None = None, *,
                  allow_pickle: bool = False) -> tuple[nn.Module, VitShape]:
    """The ancestry model (eval mode) and its shape; ``PassError`` when it is not a uniform block stack."""
    from zoocompiler.sources import load_model

    model = load_model(spec, checkpoint=checkpoint, allow_pickle=allow_pickle)
    return model, ancestry_shape(model)


def _splits(data: str, shape: VitShape) -> tuple[DataSplit, DataSplit]:
    train_split, test_split = load_dataset(data, "train"), load_dataset(data, "test")
    want = (shape.in_chans, *shape.img_size)
    if tuple(train_split.x.shape[1:]) != want or train_split.num_classes != shape.num_classes:
        raise DataError(f"the ancestry takes {want} inputs and {shape.num_classes} classes but --data {data} has "
                        f"{tuple(train_split.x.shape[1:])} and {train_split.num_classes}",
                        "distil with the data the ancestry was trained on (the demo ancestry: mnist5k)")
    return train_split, test_split


def aux_shapes(shape: VitShape, config: PoolDistillConfig) -> tuple[VitShape, VitShape, dict[str, int]]:
    """(narrow, wide) auxiliary shapes and the levels distilled into each (``small``, ``large``); ``ZooError``
    for l ≥ L, a narrow width that is not below the ancestry's or not whole heads, or more levels than blocks."""
    blocks = config.blocks if config.blocks is not None else shape.depth // 2
    dim = config.dim if config.dim is not None else max(shape.head_dim, shape.embed_dim // 4 // shape.head_dim
                                                        * shape.head_dim)
    if dim >= shape.embed_dim:
        raise ZooError(f"--dim {dim} is not below the ancestry's width {shape.embed_dim}: the narrow row must be "
                       "narrower (Algorithm 1, d' < d)",
                       f"pass --dim as a multiple of {shape.head_dim} below {shape.embed_dim}, e.g. "
                       f"{max(shape.head_dim, shape.embed_dim // 4 // shape.head_dim * shape.head_dim)}")
    narrow, wide = shape.derive(blocks, dim), shape.derive(blocks, shape.embed_dim)
    levels = {"small": config.levels, "large": config.wide_levels}
    for row, flag in (("small", "levels"), ("large", "wide-levels")):
        if levels[row] is None:
            levels[row] = min(DENSE_LEVELS, blocks)
        elif levels[row] > blocks:
            raise ZooError(f"--{flag} {levels[row]} exceeds the auxiliary models' {blocks} blocks",
                           f"pass --{flag} in 1..{blocks}")
    return narrow, wide, levels


def distill_row(ancestry: nn.Module, aux_shape: VitShape, levels: list[tuple[int, int]], split: DataSplit,
                config: PoolDistillConfig, desc: str) -> tuple[nn.Module, DistillResult]:
    """One auxiliary model of ``aux_shape``, built from ``config.seed`` and distilled from ``ancestry`` on ``split``
    with ``config``'s Eq. 8 settings at the (ancestry block, auxiliary block) ``levels``; eval mode."""
    seed_everything(config.seed)
    aux = build_vit(aux_shape)
    result = distill(ancestry, aux, split, levels=levels, alpha=config.alpha, tau=config.tau, epochs=config.epochs,
                     lr=config.lr, batch_size=config.batch_size, seed=config.seed, progress=config.progress, desc=desc)
    return aux.eval(), result


def _distill_job(job: tuple[str, VitShape, list[tuple[int, int]]], *, ancestry: nn.Module, split: DataSplit,
                 config: PoolDistillConfig) -> tuple[nn.Module, DistillResult]:
    """One auxiliary model of the pool (``job``: its row name, shape and levels), an item of the executor."""
    row, aux_shape, pairs = job
    return distill_row(ancestry, aux_shape, pairs, split, config, f"distill {row} row")


def _pool_doc(config: PoolDistillConfig, shape: VitShape, ancestry: nn.Module, narrow: VitShape, wide: VitShape,
              input_shape: tuple[int, ...]) -> dict[str, Any]:
    return {"format": POOL_FORMAT,
            "ancestry": {"spec": config.spec,
                         "checkpoint": None if config.checkpoint is None else str(Path(config.checkpoint).resolve()),
                         "weights_sha256": weights_hash(ancestry),
                         "shape": shape.to_dict(), "params": count_params(ancestry),
                         "macs": count_macs(ancestry, input_shape, eval=True)},
            "rows": {"small": narrow.to_dict(), "large": wide.to_dict()},
            "input_shape": list(input_shape), "data": config.data, "init": config.init,
            "settings": config.settings()}


def distill_pool(config: PoolDistillConfig, out: Path, *, force: bool = False,
                 progress: Progress | None = None, executor: Executor | None = None) -> dict[str, Any]:
    """Distil the ancestry into two auxiliary models (each an item of ``executor``), pool their blocks, initialise
    the stitches and write the pool directory ``out`` (see :mod:`.store`); returns ``pool.json``'s content."""
    executor = executor or LocalExecutor()

    config.check()
    check_out_dir(Path(out), force)
    stages = Stages(progress)
    with stages("prepare", f"loading ancestry {config.spec} and --data {config.data}"):  # every input, before work
        ancestry, shape = load_ancestry(config.spec, config.checkpoint, allow_pickle=config.allow_pickle)
        narrow, wide, levels = aux_shapes(shape, config)
        train_split, test_split = _splits(config.data, shape)
    blocks, input_shape = narrow.depth, tuple(train_split.x.shape[1:])

    def body(staging: Path) -> dict[str, Any]:
        doc = _pool_doc(config, shape, ancestry, narrow, wide, input_shape)
        doc["ancestry"]["accuracy"] = evaluate(ancestry, test_split)
        rows, maps, history = {}, {}, {}
        jobs = [(row, aux_shape, dense_levels(shape.depth, blocks, levels[row]))
                for row, aux_shape in (("large", wide), ("small", narrow))]
        with stages("distill", f"distilling {shape.depth} blocks at d={shape.embed_dim} into {blocks} at "
                               + " and ".join(f"d={a.embed_dim} (levels {p})" for _, a, p in jobs)):
            quiet = dataclasses.replace(config, progress=False) if executor.remote else config  # bars: in-process
            done = executor.map(functools.partial(_distill_job, ancestry=ancestry, split=train_split, config=quiet),
                                jobs)
        for (row, _, pairs), (aux, result) in zip(jobs, done, strict=True):
            rows[row], maps[row] = aux, result.transforms
            history[row] = {"levels": [list(p) for p in pairs], "epochs": result.epochs,
                            "seconds": result.history.seconds, "accuracy": evaluate(aux, test_split)}
        with stages("stitch", f"pooling {2 * blocks} instances, {blocks - 1} stitch layers ({config.init} init)"):
            pool = LearngenePool(rows["small"], rows["large"], example_batch(input_shape))
            probe = train_split.x[torch.randperm(len(train_split), generator=torch.Generator().manual_seed(config.seed))
                                  [: config.probe]]
            pool.init_stitches(config.init, matrix=maps["small"].stitch_matrix(), probe=probe, seed=config.seed)
        with stages("evaluate", f"evaluating {blocks + 1} descendants"):
            doc["descendants"] = pool.descendant_rows(test_split, input_shape)
        doc.update(levels={row: history[row]["levels"] for row in history}, distill=history,
                   storage=pool.storage(), finetune=None)
        doc["weights"] = write_weights(staging, pool, maps["small"])
        doc["timings"] = stages.timings
        write_report(staging, doc, POOL_FILE)
        return doc

    return run_staged(config, out, force, body)


def _ancestry_of(doc: dict[str, Any], root: Path, trust_code: bool, allow_pickle: bool) -> nn.Module:
    """The ancestry a pool was distilled from, checked to be the same weights."""
    from zoocompiler.sources import check_spec_from_file

    spec = check_spec_from_file(doc["ancestry"]["spec"], f"{root / POOL_FILE}", trust_code=trust_code)
    ancestry, _ = load_ancestry(str(spec), doc["ancestry"].get("checkpoint"), allow_pickle=allow_pickle)
    if weights_hash(ancestry) != doc["ancestry"]["weights_sha256"]:
        raise CheckpointError(f"the ancestry {doc['ancestry']['spec']} no longer has the weights pool {root} was "
                              "distilled from", "restore its checkpoint, or distil a new pool from it")
    return ancestry


def finetune_pool(directory: Path, config: PoolFinetuneConfig, *, out: Path | None = None, force: bool = False,
                  trust_code: bool = False, allow_pickle: bool = False,
                  progress: Progress | None = None, workers: int = 1) -> dict[str, Any]:
    """Fine-tune the pool at ``directory`` (Algorithm 1, lines 11-14) into ``out`` (default: in place).
    ``trust_code`` / ``allow_pickle`` allow a ``python:`` ancestry spec / a pickled ancestry checkpoint.
    ``workers`` > 1 fine-tunes data-parallel on that many Ray Train workers (``..data_parallel``; every worker
    samples the same path each step), recorded as ``finetune.workers``."""
    config.check()
    check_workers(workers, config.batch_size)
    source = read_pool(Path(directory))
    target = Path(out) if out is not None else source.root
    in_place = target.resolve() == source.root.resolve()
    if not in_place:
        check_keeps(target, source.root, "the pool directory", source.root.parent / (source.root.name + "_tuned"))
        check_out_dir(target, force)
    stages = Stages(progress)
    with stages("prepare", f"loading pool {source.root} and its ancestry {source.doc['ancestry']['spec']}"):
        pool = source.load_pool()  # every input, before any work
        transforms = source.load_transforms()
        ancestry = _ancestry_of(source.doc, source.root, trust_code, allow_pickle) if config.kd else None
        train_split, test_split = _splits(source.doc["data"], source.rows["large"])

    def body(staging: Path) -> dict[str, Any]:
        with stages("finetune", f"fine-tuning {pool.depth + 1} paths for {config.epochs} epochs"
                                f"{' with the ancestry as teacher' if config.kd else ''}"
                                f"{f' on {workers} Ray Train workers' if workers > 1 else ''}"):
            history, counts = run_data_parallel(pool, lambda: finetune(
                pool, train_split, ancestry=ancestry, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                tau=config.tau, seed=config.seed, progress=config.progress), workers)
        with stages("evaluate", "evaluating the descendants"):
            rows = pool.descendant_rows(test_split, source.input_shape)
        doc = dict(source.doc)
        doc["descendants_before_finetune"] = source.doc.get("descendants_before_finetune") or source.doc["descendants"]
        doc["descendants"] = rows
        doc["finetune"] = {"epochs": config.epochs + ((source.doc.get("finetune") or {}).get("epochs") or 0),
                           "lr": config.lr, "batch_size": config.batch_size, "kd": config.kd, "tau": config.tau,
                           "seed": config.seed, "paths_sampled": dict(zip(map(str, range(pool.depth + 1)), counts,
                                                                           strict=True)),
                           "seconds": history.seconds, "workers": workers}
        doc["storage"] = pool.storage()
        doc["weights"] = write_weights(staging, pool, transforms)
        doc["timings"] = stages.timings
        write_report(staging, doc, POOL_FILE)
        return doc

    return run_staged(config, target, force or in_place, body)


def _feasible(row: dict[str, Any], budget: Budget) -> bool:
    return all(getattr(budget, m) is None or row[m] <= getattr(budget, m) for m in ("params", "macs", "latency_ms"))


def _no_descendant(rows: list[dict[str, Any]], budget: Budget) -> BudgetError:
    """The error naming the descendant smallest on the budget's own metrics (params first when it has several)."""
    metrics = [m for m in ("params", "macs", "latency_ms") if getattr(budget, m) is not None and m in rows[0]]
    smallest = min(rows, key=lambda r: tuple(r[m] for m in metrics or ["params"]))
    reach = ", ".join(f"{label}={human_metric(smallest[m], m, round_up=True)}"
                      for m, label in (("params", "params"), ("macs", "flops"), ("latency_ms", "latency"))
                      if m in smallest)  # a stored table has no latency yet
    return BudgetError(f"no descendant meets {budget}: the smallest (low={smallest['low']}, high={smallest['high']}) "
                       f"has {reach}", f"raise the budget to at least {reach}")


def pick_descendant(rows: list[dict[str, Any]], budget: Budget) -> dict[str, Any]:
    """The most accurate descendant within ``budget`` (ties: fewer params); ``BudgetError`` naming the
    smallest reachable one when none fits."""
    feasible = [r for r in rows if _feasible(r, budget)]
    if not feasible:
        raise _no_descendant(rows, budget)
    return max(feasible, key=lambda r: (r["accuracy"], -r["params"]))


def onnx_name(row: dict[str, Any]) -> str:
    return f"low{row['low']}_high{row['high']}.onnx"


def measure_descendants(pool: LearngenePool, rows: list[dict[str, Any]], folder: Path, example: torch.Tensor, *,
                        runs: int, threads: int = 1, executor: Executor | None = None,
                        deploy: DeployOptions | None = None, calibration: torch.Tensor | None = None,
                        evaluation: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Export each row's descendant to ``folder`` at ``deploy.precision`` (default fp32; the fp32 export
    parity-checked against PyTorch on ``example``, int8 calibrated on ``calibration``, every file scored on
    ``evaluation``; no latency table) and add the written file's ONNX Runtime latency at ``example``'s batch
    (median of ``runs``): ``latency_ms`` (the batch), ``per_sample_ms``, ``onnx_max_abs_diff`` (the fp32 export),
    ``precision`` and ``deploy`` (the written file's precision result). Rows are updated in place and returned."""
    options = dataclasses.replace(deploy or DeployOptions(), latency_runs=0)
    executor = executor or LocalExecutor()
    export = functools.partial(_export_descendant, pool=pool, example=example, options=options,
                               calibration=calibration, evaluation=evaluation)
    for row, exported in zip(rows, executor.map_writing(export, rows, folder), strict=True):
        # the written file, timed on this machine or --latency-node, never on a worker
        latency = executor.at_target(measure_latency, (folder / onnx_name(row)).read_bytes(), tuple(example.shape),
                                     runs=runs, threads=threads)
        row.update(exported, latency_ms=latency.median_ms, per_sample_ms=latency.median_ms / len(example))
    return rows


def _export_descendant(row: dict[str, Any], folder: Path, *, pool: LearngenePool, example: torch.Tensor,
                       options: DeployOptions, calibration: torch.Tensor | None,
                       evaluation: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    """Export ``row``'s descendant into ``folder``: the row's ``onnx_max_abs_diff``, ``precision`` and ``deploy``."""
    report = export_deployable(pool.descendant(row["low"]), example, folder / onnx_name(row), options,
                               calibration=calibration, evaluation=evaluation)
    return {"onnx_max_abs_diff": report.export.max_abs_diff, "precision": report.precision,
            "deploy": report.written()}


def build_from_pool(directory: Path, config: PoolBuildConfig, out: Path, *, force: bool = False,
                    progress: Progress | None = None, executor: Executor | None = None) -> dict[str, Any]:
    """Measure every descendant of the pool at ``directory`` and export the best one within the budget; each
    descendant's export is an item of ``executor``, latency runs where its ``at_target`` runs."""
    config.check()
    check_deployable(config.deploy)  # a CUDA provider without a GPU fails before any work
    source = read_pool(Path(directory))
    budget = config.parsed_budget()
    check_keeps(out, source.root, "the pool directory", source.root.parent / (source.root.name + "_build"))
    stored = source.doc["descendants"]  # params and MACs are known before any export: fail before the work
    if not any(_feasible(r, Budget(params=budget.params, macs=budget.macs)) for r in stored):
        raise _no_descendant(stored, budget)
    check_out_dir(Path(out), force)
    stages = Stages(progress)
    with stages("prepare", f"loading pool {source.root}"):  # every input, before any work
        pool = source.load_pool()
        train_split, test_split = _splits(source.doc["data"], source.rows["large"])
    deploy = config.deploy
    evaluation = (test_split.x, test_split.y)

    def body(staging: Path) -> dict[str, Any]:
        with stages("evaluate", f"evaluating {pool.depth + 1} descendants"):
            rows = pool.descendant_rows(test_split, source.input_shape)
        folder = staging / ALL_DIR
        folder.mkdir()
        example = torch.randn(config.batch, *source.input_shape, generator=torch.Generator().manual_seed(0))
        with stages("measure", f"exporting and timing {len(rows)} descendants ({deploy.precision}, ONNX Runtime, "
                               f"batch {config.batch})"):
            measure_descendants(pool, rows, folder, example, runs=config.runs, threads=config.threads, deploy=deploy,
                                calibration=train_split.x, evaluation=evaluation, executor=executor)
        chosen = pick_descendant(rows, budget)
        with stages("deploy", f"exporting the chosen descendant (low={chosen['low']}) at {deploy.precision}"
                              + (" with the per-precision latency table" if deploy.latency_runs else "")):
            # the same graph as its row's file (only the exporter's metadata may differ), the other precisions
            # measured too; --all keeps this very file
            report = export_deployable(pool.descendant(chosen["low"]), example, staging / DESCENDANT_ONNX, deploy,
                                       calibration=train_split.x, evaluation=evaluation, progress=progress,
                                       time_latency=False)
            time_report(report, deploy, at=(executor or LocalExecutor()).at_target, progress=progress)
            chosen["deploy"] = report.written()
        if config.export_all:
            shutil.copyfile(staging / DESCENDANT_ONNX, folder / onnx_name(chosen))
            top = max(r["macs"] for r in rows)
            write_manifest(folder, [{"rate": r["macs"] / top, "onnx": onnx_name(r), "low": r["low"], "high": r["high"],
                                     "params": r["params"], "macs": r["macs"], "latency_ms": r["latency_ms"],
                                     "per_sample_ms": r["per_sample_ms"], "accuracy": r["accuracy"],
                                     "precision": r["precision"], "deploy": r["deploy"]} for r in rows],
                           extra={"pool": str(source.root), "rate_is": "MACs / the largest descendant's MACs",
                                  "precision": deploy.precision, "io_types": deploy.io_types})
        else:
            shutil.rmtree(folder)
        ancestry = source.doc["ancestry"]
        anchors = ({"ancestry": (ancestry["params"], ancestry["accuracy"])}
                   if "params" in ancestry and "accuracy" in ancestry else None)
        plot_descendants({"Learngene Pool": rows}, staging / PLOT, chosen=chosen, budget=budget, anchors=anchors)
        out = {"pool": str(source.root), "budget": budget.to_dict(), "chosen": chosen, "descendants": rows,
               "storage": source.doc.get("storage"), "onnx": DESCENDANT_ONNX,
               "all": ALL_DIR if config.export_all else None, "plot": PLOT, "precision": deploy.precision,
               "deploy": report.to_dict(DESCENDANT_ONNX), "timings": stages.timings}
        write_report(staging, out)
        return out

    return run_staged(config, Path(out), force, body)


def list_pool(directory: Path) -> dict[str, Any]:
    """What a pool directory holds: ancestry, rows, storage, fine-tuning and the descendant table."""
    source = read_pool(Path(directory))
    source.check_weights()
    doc = source.doc
    return {"pool": str(source.root), "format": doc["format"], "ancestry": doc["ancestry"], "rows": doc["rows"],
            "levels": doc.get("levels"), "init": doc["init"], "storage": doc.get("storage"),
            "finetune": doc.get("finetune"), "descendants": doc["descendants"],
            "descendants_before_finetune": doc.get("descendants_before_finetune")}
