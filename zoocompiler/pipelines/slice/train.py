"""Model-slicing training (paper 003 §3.5): build a sliceable model from a spec, train it with a
slice-rate scheduler, evaluate every rate, and save/load the result as a directory.

A trained directory holds ``sliceable.safetensors`` (the converted model's weights), ``slice.json``
(everything needed to rebuild it: spec, input shape, groups, rescale, lb, training options,
history, per-rate accuracy and size) and ``accuracy.png``. :func:`load_trained` rebuilds the
:class:`~zoocompiler.passes.rewrite.slicing.SliceableModel` from it and checks its structure fingerprint.
A ``python:`` spec in ``slice.json`` would import and call code, so rebuilding one needs ``trust_code``
(``slice export --trust-code``); ``slice train`` itself trusts the spec it is given on its command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoocompiler.core.atomic import write_state_dict_atomic
from zoocompiler.core.errors import CheckpointError
from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.plots import pyplot, save_png
from zoocompiler.core.rates import DEFAULT_GROUPS, RATE_TOLERANCE
from zoocompiler.core.schema import NUMBER, ListOf, OneOf, Where, load_json
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.plans import graph_fingerprint
from zoocompiler.passes.rewrite.slicing import SliceableModel, make_sliceable
from zoocompiler.solvers.slice_rates import (
    RateScheduler,
    SandwichScheduler,
    check_rate,
    make_scheduler,
    valid_rates,
)
from zoocompiler.sources import check_spec_from_file, read_state_dict
from zoocompiler.training import History, evaluate, seed_everything, train

from ..base import Stages, write_report
from ..data_parallel import check_workers, run_data_parallel
from ..zoo.trainable import example_input, load_trainable
from .config import SliceTrainConfig, check_training

TRAINED_FORMAT = "zoocompiler.sliceable/1"
WEIGHTS_FILE, RECORD_FILE, PLOT_FILE = "sliceable.safetensors", "slice.json", "accuracy.png"
TRUST_FIX = ("pass --trust-code (trust_code=True) only if you trained that directory yourself "
             "from this python: spec")


# ----------------------------------------------------------------------------- build


def build_sliceable(
    spec: str,
    input_shape: tuple[int, ...],
    *,
    groups: int = DEFAULT_GROUPS,
    rescale: str = "dense",
    sort_by: str | None = None,
    from_scratch: bool = False,
    checkpoint: str | None = None,
    allow_pickle: bool = False,
    num_classes: int | None = None,
) -> SliceableModel:
    """Load ``spec`` (optionally a local checkpoint, or re-initialised), trace it at ``input_shape`` and
    make it sliceable. ``num_classes`` checks the classifier width against the data."""
    model = load_trainable(spec, tuple(input_shape), from_scratch=from_scratch, checkpoint=checkpoint,
                           allow_pickle=allow_pickle, num_classes=num_classes)
    return make_sliceable(trace(model, example_input(tuple(input_shape))), groups=groups, rescale=rescale,
                          sort_by=sort_by)


# ----------------------------------------------------------------------------- train


class _Freezer:
    """Progressive static scheduling: keep the previous stage's r-subnet weights fixed (paper §3.5.2)."""

    def __init__(self, model: SliceableModel):
        self.model, self.rate, self.saved = model, None, {}

    def update(self, rate: float | None) -> None:
        if rate == self.rate:
            return
        self.rate, self.saved = rate, {}
        if rate is None:
            return
        params = dict(self.model.gm.named_parameters())
        self.saved = {name: (inside, params[name].detach().clone())
                      for name, inside in self.model.subnet_masks(rate).items()}

    @torch.no_grad()
    def restore(self) -> None:
        params = dict(self.model.gm.named_parameters())
        for name, (inside, value) in self.saved.items():
            params[name].copy_(torch.where(inside, value, params[name]))


def train_sliceable(
    model: SliceableModel,
    split: DataSplit,
    scheduler: RateScheduler,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 128,
    weight_decay: float = 0.05,
    augment: bool = True,
    seed: int = 0,
    progress: bool = True,
    eval_split: DataSplit | None = None,
    on_rate: Callable[[float], None] | None = None,
    workers: int = 1,
    execution: str = "views",
    distill: bool = False,
) -> History:
    """Train ``model`` in place: each batch runs the r-subnet for an r drawn from ``scheduler``
    (seeded numpy generator; progress = step / total steps), or, for the sandwich rule, every rate of
    ``scheduler.step_rates`` with their losses added. Progressive static scheduling keeps the previous
    stage's subnet fixed. ``execution`` "views" runs each subnet's own graph on slices of the shared
    weights (the same step as "masked", at about r² of the work). ``distill`` (sandwich only): rates below 1
    learn from the full width's softened predictions of the same batch (in-place distillation) instead of
    the labels. Leaves the model at rate 1.0, in eval mode, with its own ``execution``. ``workers`` > 1
    trains data-parallel on Ray Train (:mod:`..data_parallel`; every worker draws the same rates,
    ``on_rate`` is called on the workers)."""
    check_training("sandwich" if isinstance(scheduler, SandwichScheduler) else "one rate per batch", distill)
    steps_per_epoch = len(split) // batch_size if len(split) > batch_size else 1
    total = max(1, epochs * steps_per_epoch)
    rng = np.random.default_rng(seed)
    freezer = _Freezer(model)
    frozen_rate = getattr(scheduler, "frozen_rate", None)
    state = {"step": 0}

    def step_rates(progress_frac: float) -> tuple[float, ...]:
        if isinstance(scheduler, SandwichScheduler):
            return scheduler.step_rates(progress_frac, rng)
        return (scheduler.sample(progress_frac, rng),)

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        progress_frac = min(1.0, state["step"] / total)
        if frozen_rate is not None:
            freezer.restore()  # undo the previous optimizer step on frozen weights (AdamW decays them too)
            freezer.update(frozen_rate(progress_frac))
        rates = step_rates(progress_frac)
        if on_rate is not None:
            for rate in rates:
                on_rate(rate)
        state["step"] += 1
        if len(rates) == 1:
            model.rate = rates[0]
            return F.cross_entropy(net(x), y)
        model.rate = rates  # one forward call for every width (DDP reduces once per backward)
        full, *smaller = net(x)
        model.rate = rates[0]
        loss = F.cross_entropy(full, y)
        teacher = full.detach().softmax(1) if distill else None
        for logits in smaller:
            loss = loss + (F.cross_entropy(logits, y) if teacher is None
                           else -(teacher * logits.log_softmax(1)).sum(1).mean())
        return loss

    def fit() -> History:
        history = train(model, split, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress,
                        augment=augment, weight_decay=weight_decay, loss_fn=loss_fn, eval_split=eval_split,
                        desc="slice-train")
        freezer.restore()
        return history

    before = model.execution
    model.execution = execution
    try:
        return run_data_parallel(model, fit, workers)
    finally:
        model.execution, model.rate = before, 1.0


def evaluate_rates(model: SliceableModel, split: DataSplit, rates: list[float]) -> dict[float, dict[str, Any]]:
    """Accuracy, params and per-sample MACs of the materialised r-subnet for every rate."""
    out = {}
    for r in rates:
        sliced = model.slice(r)
        out[sliced.rate] = {**sliced.to_dict(), "accuracy": evaluate(sliced.module, split)}
    return out


# ----------------------------------------------------------------------------- directory


def plot_accuracy(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy (left axis) and MACs relative to the full model (right axis) against the slice rate."""
    rates = [r["rate"] for r in rows]
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    ax.plot(rates, [100 * r["accuracy"] for r in rows], "o-", label="accuracy")
    ax.set_xlabel("slice rate r")
    ax.set_ylabel("test accuracy (%)")
    ax2 = ax.twinx()
    full = max(r["macs"] for r in rows)
    ax2.plot(rates, [r["macs"] / full for r in rows], "s--", color="gray", label="MACs / full")
    ax2.set_ylabel("MACs / full")
    ax.set_title(title)
    fig.legend(loc="lower right")
    return save_png(fig, path)


def train_to_dir(config: SliceTrainConfig, out_dir: Path, progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """Build, train and evaluate per :class:`SliceTrainConfig`; write the trained directory into
    ``out_dir`` (an empty staging directory) and return the record written to ``slice.json``. ``workers`` > 1
    trains data-parallel on that many Ray Train workers (recorded as ``workers``)."""
    config.check()
    check_workers(workers, config.batch_size)
    stages = Stages()
    with stages("build"):
        train_split, test_split = load_dataset(config.data, "train"), load_dataset(config.data, "test")
        seed_everything(config.seed)  # randomly initialised specs start from the same weights
        shape = tuple(train_split.input_shape)
        model = build_sliceable(config.spec, shape, groups=config.groups, rescale=config.rescale,
                                sort_by=config.sort_by, from_scratch=config.from_scratch,
                                checkpoint=config.checkpoint, allow_pickle=config.allow_pickle,
                                num_classes=train_split.num_classes)
    with stages("train"):
        rates = valid_rates(config.groups, config.lb)
        scheduler = make_scheduler(config.scheduler, rates, **config.scheduler_options)
        history = train_sliceable(model, train_split, scheduler, epochs=config.epochs, lr=config.lr,
                                  batch_size=config.batch_size, weight_decay=config.weight_decay,
                                  augment=config.augment, seed=config.seed, progress=progress, workers=workers,
                                  execution=config.execution, distill=config.distill)
    with stages("evaluate"):
        per_rate = evaluate_rates(model, test_split, valid_rates(config.groups))
    record = {
        "format": TRAINED_FORMAT,
        "config": asdict(config),
        "input_shape": list(shape),
        "num_classes": train_split.num_classes,
        "fingerprint": graph_fingerprint(model.gm),
        "train_seconds": history.seconds,
        "workers": workers,
        "history": jsonable([asdict(e) for e in history.epochs], finite=True),
        "rates": [
            {"rate": r, **{k: v for k, v in row.items() if k != "rate"}, "trained": r >= config.lb - RATE_TOLERANCE}
            for r, row in per_rate.items()
        ],
        "timings": stages.timings,
    }
    write_state_dict_atomic(out_dir / WEIGHTS_FILE, model.gm.state_dict())
    plot_accuracy(record["rates"], out_dir / PLOT_FILE, f"{config.spec} (lb {config.lb:g}, {config.scheduler})")
    write_report(out_dir, record, RECORD_FILE)
    return record


_RATE = Where(NUMBER, lambda r: 0 < r <= 1 + RATE_TOLERANCE, "a rate in (0, 1]")
RECORD_SCHEMA = {
    "format": OneOf((TRAINED_FORMAT,)),
    "config": {
        "spec": str,
        "data": str,
        "lb": _RATE,
        "groups": Where(int, lambda g: g >= 1, "an integer >= 1"),
        "rescale": str,
    },
    "input_shape": ListOf(Where(int, lambda d: d >= 1, "a positive integer"), 1),
    "fingerprint": str,
    "rates": ListOf({"rate": _RATE, "trained": bool}),
}
RECORD_FIX = "re-run `zoocompile slice train` (slice.json is written by it; see docs/slice.md)"


def read_record(directory: str | Path) -> dict[str, Any]:
    """``slice.json`` of a trained directory, checked against :data:`RECORD_SCHEMA`; a missing, foreign or
    malformed file, or a ``config.lb`` below the lower bound the rates were trained with, is a ``CheckpointError``."""
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {RECORD_FILE}",
                              "pass a directory written by `zoocompile slice train`")
    record = load_json(path, RECORD_SCHEMA, what="sliceable-model record", error=CheckpointError, fix=RECORD_FIX)
    lb = record["config"]["lb"]
    untrained = [row["rate"] for row in record["rates"] if not row["trained"] and row["rate"] >= lb - RATE_TOLERANCE]
    if untrained:
        trained = [row["rate"] for row in record["rates"] if row["trained"]]
        low = f"{min(trained):g}" if trained else "none"
        raise CheckpointError(
            f"{path}: config.lb {lb:g} is below the lowest trained rate ({low}); "
            f"rate {max(untrained):g} was not trained",
            f"restore config.lb to {low}, or re-run `zoocompile slice train --lb {lb:g}`",
        )
    return record


def record_spec(record: dict[str, Any], directory: str | Path, *, trust_code: bool = False) -> str:
    """The model spec of a ``slice.json`` record, checked before anything is built: a ``python:`` spec
    (it imports and calls code) is a ``ZooError`` unless ``trust_code``."""
    cfg = record.get("config")
    spec = cfg.get("spec") if isinstance(cfg, dict) else None
    check_spec_from_file(spec, f"{Path(directory) / RECORD_FILE} (config.spec)", trust_code=trust_code, fix=TRUST_FIX)
    return spec


def load_trained(directory: str | Path, *, trust_code: bool = False) -> tuple[SliceableModel, dict[str, Any]]:
    """Rebuild the trained sliceable model of ``directory`` (weights loaded, fingerprint checked).

    ``slice.json`` is data: a ``python:`` spec in it is refused (``ZooError``, nothing imported) unless
    ``trust_code`` — pass it only for a directory you trained yourself from that spec."""
    record = read_record(directory)
    spec = record_spec(record, directory, trust_code=trust_code)
    cfg = record["config"]
    model = build_sliceable(spec, tuple(record["input_shape"]), groups=cfg["groups"], rescale=cfg["rescale"])
    if graph_fingerprint(model.gm) != record["fingerprint"]:
        raise CheckpointError(f"{directory}: the rebuilt '{cfg['spec']}' has another structure than the trained one",
                              "use the zoocompiler and model versions the directory was trained with")
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}", "re-run `zoocompile slice train`")
    state = read_state_dict(weights)
    missing, unexpected = model.gm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: {len(missing)} missing and {len(unexpected)} unexpected tensors",
                              "re-run `zoocompile slice train`")
    return model.eval(), record


def requested_rates(model: SliceableModel, record: dict[str, Any], rates: list[float]) -> list[float]:
    """Validate export rates against the model's grid and its training lower bound (``ZooError``)."""
    lb = record["config"]["lb"]
    return sorted({check_rate(r, model.groups, lb) for r in rates})

