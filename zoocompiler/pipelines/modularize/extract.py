"""Modularizing (paper 004 §3.3): per-class module masks at threshold τ, Table 2's metrics, and one
extracted module per class written as a verified ONNX model at the chosen precision (``export_deployable``:
int8 calibrated on the class's training samples; recall of the written model on the class's test samples).

Kernel sets come from the whole training split: mask > 0 for the modular model, a non-zero output for
the standard model (the same rule applied to it gives the "modularize a standard model" baseline).
A module keeps kernel ``k`` when more than τ of its class's training samples use it; a layer left empty
gets τ lowered by 0.05 for that layer (reported). Every module is cut by the prune pass
(:func:`~zoocompiler.passes.rewrite.mask_generators.extract_module`); a ``gated`` module is checked
against the modular model with the module's mask applied (``gated_parity``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from zoocompiler.core.atomic import write_json_atomic
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import DataError, PassError
from zoocompiler.core.modules import count_macs, count_params, eval_mode
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.exports.deploy import check_deployable, export_deployable, time_report
from zoocompiler.ir import graph_info
from zoocompiler.passes.rewrite.mask_generators import (
    SEMANTICS,
    GatePoints,
    extract_module,
    insert_kernel_probes,
    module_plan,
)
from zoocompiler.training import fixed_threads

from ..base import Executor, LocalExecutor, Stages, local_only, write_report
from .config import ModularizeExtractConfig
from .metrics import ModuleMasks, module_masks, module_table
from .plots import plot_overlap
from .train import TrainedModularization, load_trained

MODULES_FILE, OVERLAP_PLOT = "modules.json", "overlap.png"
MODULES_FORMAT = "zoocompiler.modules/1"
PARITY_SAMPLES = 64
PARITY_TOLERANCE = 1e-4  # relative to the output's magnitude, as for ONNX parity


@dataclass
class KernelSets:
    """Per-sample kernel sets ``[samples, kernels]`` (bool) of a split, the samples' labels and, per class,
    the sum of the mask values ``[classes, kernels]``."""

    sets: np.ndarray
    labels: np.ndarray
    value_sums: np.ndarray

    def by_class(self, num_classes: int) -> list[np.ndarray]:
        return [self.sets[self.labels == c] for c in range(num_classes)]

    def masks(self, num_classes: int, threshold: float, points: GatePoints) -> ModuleMasks:
        counts = np.stack([s.sum(0) for s in self.by_class(num_classes)])
        totals = np.bincount(self.labels, minlength=num_classes)
        empty = [c for c in range(num_classes) if totals[c] == 0]
        if empty:
            raise DataError(f"class {empty[0]} has no training sample, so it has no module",
                            "train on a dataset with samples of every class the model predicts")
        masks = module_masks(counts, totals, threshold, points.offsets())
        masks.mean = self.value_sums[:num_classes] / np.maximum(totals, 1)[:, None]
        masks.totals = totals
        return masks


@torch.no_grad()
def kernel_sets(net: nn.Module, split: DataSplit, batch_size: int = 500) -> KernelSets:
    """The kernel sets of ``net`` (returning ``(logits, masks or activity)``) on every sample of ``split``."""
    rows, sums = [], None
    with eval_mode(net), fixed_threads(None):
        for x, y in split.loader(batch_size, shuffle=False):
            values = net(x)[1]
            rows.append((values > 0).numpy())
            if sums is None:
                sums = torch.zeros(split.num_classes, values.shape[1], dtype=torch.float64)
            sums.index_add_(0, y, values.double())
    return KernelSets(np.concatenate(rows), split.y.numpy(), sums.numpy())


def standard_kernel_sets(trained: TrainedModularization, split: DataSplit) -> KernelSets | None:
    if trained.standard is None:
        return None
    return kernel_sets(insert_kernel_probes(trained.standard, trained.points), split)


def kept_per_point(mask: np.ndarray, points: GatePoints) -> list[list[int]]:
    """A module's binary mask over all kernels → the kept kernel indices of every gate point."""
    return [np.flatnonzero(mask[a:b]).tolist() for a, b in points.offsets()]


def cut_module(trained: TrainedModularization, mask: np.ndarray, semantics: str, *, residual: str = "pad",
               round_to: int = 1, scores: np.ndarray | None = None, scale: np.ndarray | None = None) -> fx.GraphModule:
    """The module keeping the kernels of ``mask`` (bool ``[kernels]``), in eval mode; ``residual``,
    ``round_to`` and ``scores`` (per kernel) as in :func:`~zoocompiler.passes.rewrite.mask_generators.module_plan`;
    ``scale`` (per kernel, ``ModuleMasks.scale``) is what a ``calibrated`` module multiplies its kernels by."""
    kept = kept_per_point(mask, trained.points)
    offsets = trained.points.offsets()
    per_point = None if scores is None else [scores[a:b] for a, b in offsets]
    plan = module_plan(trained.plain, trained.points, kept, residual=residual, round_to=round_to, scores=per_point)
    scales = None if scale is None else [scale[a:b] for a, b in offsets]
    module = extract_module(trained.plain, trained.modular, plan, semantics, own=kept, scales=scales).eval()
    if semantics == "gated":
        check_gated(trained, module, mask)
    return module


@torch.no_grad()
def gated_parity(trained: TrainedModularization, module: nn.Module, mask: np.ndarray, x: torch.Tensor) -> float:
    """max |module(x) − modular model with ``mask`` applied (x)|: 0 up to rounding for a gated module."""
    return float((module(x) - _masked_modular(trained, mask, x)).abs().max())


def _masked_modular(trained: TrainedModularization, mask: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    try:
        trained.modular.set_module_mask(torch.from_numpy(mask.astype(np.float32)))
        return trained.modular(x)[0]
    finally:
        trained.modular.set_module_mask(None)


@torch.no_grad()
def check_gated(trained: TrainedModularization, module: nn.Module, mask: np.ndarray) -> None:
    """Fail closed: a gated module must equal the masked modular model (on the trace's example input). It does
    unless an op after a gate turns a masked 0 into a non-zero that reaches a consumer (e.g. a sigmoid or a
    parameter added to a pruned channel); then this raises ``PassError`` instead of writing an inexact module."""
    x = graph_info(trained.plain).example_input
    want = _masked_modular(trained, mask, x)
    diff = float((module(x) - want).abs().max())
    if diff > PARITY_TOLERANCE * max(1.0, float(want.abs().max())):
        raise PassError(f"the gated module differs from the masked modular model by {diff:.3g}: an op after a "
                        "mask turns a masked-out 0 into a non-zero this model's gate points do not re-gate",
                        "use --semantics static, or report the model (docs/modularize.md, gate points)")


def representative_class(masks: ModuleMasks) -> int:
    """The class whose module keeps the most kernels (the first such class): the module the latency table times."""
    return int(np.argmax(masks.masks.sum(1)))


def _class_module(
    c: int, folder: Path, *, trained: TrainedModularization, masks: ModuleMasks, train_split: DataSplit,
    test: DataSplit, semantics: str, residual: str, round_to: int, deploy: DeployOptions, timed: int | None,
    say: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Cut, check, export into ``folder`` (at ``deploy.precision``) and measure the module of class ``c``; its
    report row. Only class ``timed`` builds the latency table's models (the row's ``deploy``: its ``DeployReport``,
    still to time with ``time_report``)."""
    if say is not None:
        say(f"class {c}: cut, check, export")
    mask = masks.masks[c]
    own_all = test.x[test.y == c]
    own = own_all[:PARITY_SAMPLES]
    shape = tuple(test.x.shape[1:])
    row: dict[str, Any] = {"class": c, "kernels": int(mask.sum()), "lowered": masks.lowered.get(c, {})}
    for sem in SEMANTICS:
        module = cut_module(trained, mask, sem, residual=residual, round_to=round_to, scores=masks.scores([c]),
                            scale=masks.scale([c]))
        with torch.no_grad():
            recall = float((module(own).argmax(1) == c).float().mean()) if len(own) else float("nan")
        row[sem] = {"macs": count_macs(module, shape, eval=True), "params": count_params(module), "recall": recall}
        if sem == "gated":
            row[sem]["parity"] = gated_parity(trained, module, mask, own if len(own) else test.x[:8])
        if sem == semantics:
            path = folder / f"class_{c}.onnx"
            options = deploy if c == timed else dataclasses.replace(deploy, latency_runs=0)
            calibration = train_split.x[train_split.y == c]
            labels = torch.full((len(own_all),), c, dtype=torch.long)
            report = export_deployable(module, test.x[:2].clone(), path, options, calibration=calibration,
                                       evaluation=(own_all, labels) if len(own_all) else None,
                                       progress=say if c == timed else None, time_latency=False)
            row["onnx"] = path.name
            row["onnx_max_abs_diff"] = report.export.max_abs_diff  # the fp32 export's parity
            row["onnx_precision"] = report.written()
            if c == timed:
                report.path = path.name
                row["deploy"] = report
    return row


def extract_to_dir(directory: str | Path, out_dir: Path, config: ModularizeExtractConfig,
                   say: Callable[[str], None] = lambda _msg: None, executor: Executor | None = None) -> dict[str, Any]:
    """Write ``class_<c>.onnx`` (``config.semantics``), ``modules.json``, ``overlap.png`` and ``report.json``
    for the trained ``directory`` into ``out_dir`` (a fresh staging directory); return the report."""
    config.check()
    check_deployable(config.deploy)  # a CUDA provider without a GPU fails before any work
    round_to, round_to_reason = config.rounding()
    stages = Stages(say)
    with stages("load", f"load {directory}"):
        trained = load_trained(directory, trust_code=config.trust_code)
        train_split, test = load_dataset(trained.data, "train"), load_dataset(trained.data, "test")
    with stages("modularize", f"module masks at threshold {config.threshold:g}"):
        n = trained.num_classes
        modular_sets = kernel_sets(trained.modular, train_split)
        masks = modular_sets.masks(n, config.threshold, trained.points)
        table = module_table(masks.masks, modular_sets.by_class(n))
        standard_sets = standard_kernel_sets(trained, train_split)
        standard_table = None
        if standard_sets is not None:
            standard_table = module_table(standard_sets.masks(n, config.threshold, trained.points).masks,
                                          standard_sets.by_class(n))
    timed = representative_class(masks) if config.deploy.latency_runs else None
    executor = executor or LocalExecutor()
    cut = functools.partial(_class_module, trained=trained, masks=masks, train_split=train_split, test=test,
                            semantics=config.semantics, residual=config.residual, round_to=round_to,
                            deploy=config.deploy, timed=timed, say=local_only(executor, say))
    with stages("extract"):
        rows = executor.map_writing(cut, list(range(n)), out_dir)
    deploy = next((row.pop("deploy") for row in rows if "deploy" in row), None)
    if deploy is not None:
        with stages("latency"):  # on this machine or --latency-node, never on a worker
            deploy = time_report(deploy, config.deploy, at=executor.at_target, progress=say).to_dict(deploy.path)
    shape = tuple(test.x.shape[1:])
    whole = {"macs": count_macs(trained.plain, shape, eval=True), "params": count_params(trained.plain),
             "kernels": trained.points.kernels}
    report = {
        "source": str(directory),
        "spec": trained.record["config"]["spec"],
        "data": trained.data,
        "threshold": config.threshold,
        "semantics": config.semantics,
        "residual": config.residual,
        "round_to": round_to,
        "round_to_reason": round_to_reason,
        "precision": config.deploy.precision,
        "deploy": deploy,  # the latency table and every precision of module `deploy_class` (None: --latency-runs 0)
        "deploy_class": timed,
        "model": whole,
        "accuracy": {"standard": (trained.record.get("standard") or {}).get("accuracy"),
                     "modular": trained.record["modular"]["accuracy"]},
        "modules": {k: v for k, v in table.items() if k != "overlap"},
        "standard_modules": {k: v for k, v in standard_table.items() if k != "overlap"} if standard_table else None,
        "overlap": table["overlap"],
        "per_class": rows,
        "lowered": {str(c): v for c, v in masks.lowered.items()},
        "timings": stages.timings,
    }
    names = [str(c) for c in range(n)]
    title = f"module overlap, {report['spec']} (τ {config.threshold:g})"
    plot_overlap(table["overlap"], names, out_dir / OVERLAP_PLOT, title)
    write_json_atomic(out_dir / MODULES_FILE, {
        "format": MODULES_FORMAT, "threshold": config.threshold, "semantics": config.semantics,
        "points": [p.producer for p in trained.points.points],
        "modules": [{"class": c, "keep": kept_per_point(masks.masks[c], trained.points)} for c in range(n)],
    })
    write_report(out_dir, report)
    return report
