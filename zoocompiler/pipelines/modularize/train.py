"""Modular training (paper 004 §3.2) next to a standard training of the same model, epochs and seed,
saved as a directory that ``modularize extract`` and ``modularize reuse`` read back.

The modular model is the traced model with mask generators on every gateable producer
(:func:`~zoocompiler.passes.rewrite.mask_generators.insert_mask_generators`), trained on
CE + α·L_ch + β·L_cp. The standard model is the same traced model (same initial weights) with kernel
probes, trained on CE. Per epoch both record test accuracy, cohesion, coupling and the mean fraction
of kernels a sample uses (Fig. 5), averaged over the epoch's batches.

A trained directory holds ``modular.safetensors``, ``standard.safetensors`` (if trained),
``modularize.json`` (spec, input shape, gate points, histories) and ``training.png``. Reading it back
never imports code: a ``python:`` spec in ``modularize.json`` needs ``trust_code``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from zoocompiler.core.atomic import write_state_dict_atomic
from zoocompiler.core.errors import CheckpointError
from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.schema import NUMBER, ListOf, OneOf, Where, load_json
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.plans import graph_fingerprint
from zoocompiler.passes.rewrite.mask_generators import (
    GatePoints,
    ModularNet,
    gate_points,
    insert_kernel_probes,
    insert_mask_generators,
    plain_state,
)
from zoocompiler.sources import check_spec_from_file, check_state_dict, read_state_dict
from zoocompiler.training import EpochStats, evaluate, gather, seed_everything, train

from ..base import Stages, write_report
from ..data_parallel import check_workers, run_data_parallel
from ..zoo.trainable import example_input, load_trainable
from .config import ModularizeTrainConfig
from .losses import cohesion_loss, coupling_loss
from .metrics import EpochModularity
from .plots import plot_training

TRAINED_FORMAT = "zoocompiler.modularize/1"
MODULAR_FILE, STANDARD_FILE = "modular.safetensors", "standard.safetensors"
RECORD_FILE, PLOT_FILE = "modularize.json", "training.png"
TRUST_FIX = "pass --trust-code (trust_code=True) only if you trained that directory yourself from this python: spec"


class FirstOutput(nn.Module):
    """``module(x)[0]``: the logits of a model that returns ``(logits, masks)``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[0]


def build_graph(spec: str, shape: tuple[int, ...], **load: Any) -> fx.GraphModule:
    """The analysed graph of ``spec`` (``load``: options of :func:`~..zoo.trainable.load_trainable`)."""
    return trace(load_trainable(spec, shape, **load), example_input(shape))


# ----------------------------------------------------------------------------- training


def _modularity_loss(alpha: float, beta: float, layers: list[tuple[int, int]], tracker: dict[str, Any]) -> Callable:
    """The ``loss_fn`` of modular training; accumulates the epoch's metrics in ``tracker``."""

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, masks = net(x)
        ce = F.cross_entropy(logits, y)
        l_ch, l_cp = cohesion_loss(masks, y, layers), coupling_loss(masks, y, layers)
        _track(tracker, logits, masks, y, ce=ce.item(), cohesion_loss=l_ch.item(), coupling_loss=l_cp.item())
        return ce + alpha * l_ch + beta * l_cp

    return loss_fn


def _standard_loss(tracker: dict[str, Any]) -> Callable:
    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, activity = net(x)
        ce = F.cross_entropy(logits, y)
        _track(tracker, logits, activity, y, ce=ce.item())
        return ce

    return loss_fn


def _track(tracker: dict[str, Any], logits: torch.Tensor, masks: torch.Tensor, y: torch.Tensor,
           **losses: float) -> None:
    tracker["modularity"].add((masks.detach() > 0).numpy(), y.numpy())
    tracker["correct"] += int((logits.detach().argmax(1) == y).sum())
    tracker["seen"] += len(y)
    for k, v in losses.items():
        tracker["losses"][k] = tracker["losses"].get(k, 0.0) + v * len(y)


def _new_tracker() -> dict[str, Any]:
    return {"modularity": EpochModularity(), "correct": 0, "seen": 0, "losses": {}}


def _merged(trackers: list[dict[str, Any]]) -> dict[str, Any]:
    """One tracker summing ``trackers`` (data-parallel workers' trackers, each over its slices of the batches)."""
    if len(trackers) == 1:
        return trackers[0]
    out = _new_tracker()
    for t in trackers:
        out["correct"] += t["correct"]
        out["seen"] += t["seen"]
        for k, v in t["losses"].items():
            out["losses"][k] = out["losses"].get(k, 0.0) + v
        out["modularity"].sums += t["modularity"].sums
        out["modularity"].counts += t["modularity"].counts
    return out


def _fit(net: nn.Module, loss: Callable[[dict], Callable], split: DataSplit, test: DataSplit,
         config: ModularizeTrainConfig, desc: str, progress: bool, workers: int = 1) -> list[dict[str, Any]]:
    """Train ``net`` with ``loss(tracker)``; one row per epoch (losses, accuracies, modularity, seconds). With
    ``workers`` > 1 data-parallel on Ray Train: the rows sum every worker's tracker, whose losses and modularity
    are computed on the worker's slice of each batch."""
    rows: list[dict[str, Any]] = []
    tracker = _new_tracker()

    def on_epoch(stats: EpochStats) -> None:
        epoch = _merged(gather(tracker))
        seen = max(epoch["seen"], 1)
        rows.append({
            "epoch": stats.epoch, "loss": stats.loss, "seconds": stats.seconds,
            **{k: v / seen for k, v in epoch["losses"].items()},
            "train_accuracy": epoch["correct"] / seen,
            "accuracy": evaluate(FirstOutput(net), test),
            **epoch["modularity"].means(),
        })
        tracker.update(_new_tracker())

    def fit() -> list[dict[str, Any]]:
        train(net, split, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
              progress=progress, weight_decay=config.weight_decay, loss_fn=loss(tracker), desc=desc,
              on_epoch=on_epoch)
        return rows

    return run_data_parallel(net, fit, workers)


def train_to_dir(config: ModularizeTrainConfig, out_dir: Path, progress: bool = True,
                 say: Callable[[str], None] = lambda _msg: None, workers: int = 1) -> dict[str, Any]:
    """Build, train (modular and, unless ``config.standard`` is off, standard) and write the trained
    directory into ``out_dir`` (an empty staging directory); return the record written to ``modularize.json``.
    ``workers`` > 1 trains each model data-parallel on that many Ray Train workers (recorded as ``workers``)."""
    config.check()
    check_workers(workers, config.batch_size)
    stages = Stages(say)
    with stages("build", f"build {config.spec} on {config.data}"):
        train_split, test_split = load_dataset(config.data, "train"), load_dataset(config.data, "test")
        seed_everything(config.seed)
        shape = tuple(train_split.input_shape)
        gm = build_graph(config.spec, shape, from_scratch=config.from_scratch, checkpoint=config.checkpoint,
                         allow_pickle=config.allow_pickle, num_classes=train_split.num_classes)
        points = gate_points(gm)
        standard = copy.deepcopy(gm) if config.standard else None
        modular = insert_mask_generators(gm, points, seed=config.seed)
    on = f" on {workers} Ray Train workers" if workers > 1 else ""
    what = f"modular training: {config.epochs} epochs, alpha {config.alpha:g}, beta {config.beta:g}{on}"
    with stages("modular_train", what):
        loss = functools.partial(_modularity_loss, config.alpha, config.beta, points.offsets())
        modular_rows = _fit(modular, loss, train_split, test_split, config, "modular", progress, workers)
    standard_rows = None
    if standard is not None:
        with stages("standard_train", f"standard training: {config.epochs} epochs{on}"):
            probed = insert_kernel_probes(standard, points)
            standard_rows = _fit(probed, _standard_loss, train_split, test_split, config, "standard", progress,
                                 workers)
    record = {
        "format": TRAINED_FORMAT,
        "config": asdict(config),
        "input_shape": list(shape),
        "num_classes": train_split.num_classes,
        "class_names": list(train_split.class_names),
        "fingerprint": graph_fingerprint(gm),
        "kernels": points.kernels,
        "points": [p.to_dict() for p in points.points],
        "skipped": points.skipped,
        "modular": _summary(modular_rows),
        "standard": _summary(standard_rows) if standard_rows is not None else None,
        "workers": workers,
        "timings": stages.timings,
    }
    write_state_dict_atomic(out_dir / MODULAR_FILE, modular.state_dict())
    if standard is not None:
        write_state_dict_atomic(out_dir / STANDARD_FILE, standard.state_dict())
    plot_training(record, out_dir / PLOT_FILE)
    write_report(out_dir, record, RECORD_FILE)
    return record


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    last = rows[-1]
    return {
        "accuracy": last["accuracy"],
        "cohesion": last["cohesion"],
        "coupling": last["coupling"],
        "kernel_rate": last["kernel_rate"],
        "seconds_per_epoch": float(np.mean([r["seconds"] for r in rows])),
        "history": jsonable(rows, finite=True),
    }


# ----------------------------------------------------------------------------- reading back


_POSITIVE = Where(int, lambda d: d >= 1, "a positive integer")
RECORD_SCHEMA = {
    "format": OneOf((TRAINED_FORMAT,)),
    "config": {"spec": str, "data": str, "seed": int},
    "input_shape": ListOf(_POSITIVE, 1),
    "num_classes": _POSITIVE,
    "fingerprint": str,
    "kernels": _POSITIVE,
    "modular": {"accuracy": NUMBER},
}
RECORD_FIX = "pass a directory written by `zoocompile modularize train` (docs/modularize.md)"


@dataclass
class TrainedModularization:
    """A trained directory read back: the record, the analysed graph (``plain``: the modular model's
    weights without generators), the modular model, the standard model's analysed graph (or None)."""

    record: dict[str, Any]
    points: GatePoints
    plain: fx.GraphModule
    modular: ModularNet
    standard: fx.GraphModule | None

    @property
    def num_classes(self) -> int:
        return int(self.record["num_classes"])

    @property
    def data(self) -> str:
        return str(self.record["config"]["data"])


def read_record(directory: str | Path) -> dict[str, Any]:
    """``modularize.json`` of a trained directory, checked; a missing or foreign file is a ``CheckpointError``."""
    path = Path(directory) / RECORD_FILE
    if not Path(directory).is_dir() or not path.is_file():
        raise CheckpointError(f"{directory} is not a directory written by `zoocompile modularize train` "
                              f"(no {RECORD_FILE})", RECORD_FIX)
    return load_json(path, RECORD_SCHEMA, what="modularized-model record", error=CheckpointError, fix=RECORD_FIX)


def _load_weights(module: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}", "re-run `zoocompile modularize train`")
    state = read_state_dict(path)
    check_state_dict(module, state, label=str(path))
    module.load_state_dict(state)


def load_trained(directory: str | Path, *, trust_code: bool = False) -> TrainedModularization:
    """Rebuild the models of a trained directory (weights loaded, structure fingerprint checked)."""
    directory = Path(directory)
    record = read_record(directory)
    spec = record["config"]["spec"]
    check_spec_from_file(spec, f"{directory / RECORD_FILE} (config.spec)", trust_code=trust_code, fix=TRUST_FIX)
    gm = build_graph(spec, tuple(record["input_shape"]))
    if graph_fingerprint(gm) != record["fingerprint"]:
        raise CheckpointError(f"{directory}: the rebuilt '{spec}' has another structure than the trained one",
                              "use the zoocompiler and model versions the directory was trained with")
    points = gate_points(gm)
    if jsonable([p.to_dict() for p in points.points]) != record.get("points"):
        raise CheckpointError(f"{directory}: the gate points of the rebuilt model differ from the record's",
                              "use the zoocompiler version the directory was trained with")
    standard = None
    if (directory / STANDARD_FILE).is_file():
        standard = copy.deepcopy(gm)
        _load_weights(standard, directory / STANDARD_FILE)
        standard.eval()
    modular = insert_mask_generators(gm, points)
    _load_weights(modular, directory / MODULAR_FILE)
    gm.load_state_dict(plain_state(modular))
    return TrainedModularization(record, points, gm.eval(), modular.eval(), standard)
