"""The options of ``zoocompile modularize train | extract | reuse``; torch-free, so the CLI reads its
defaults without importing torch. ``check()`` raises ``ZooError`` before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from zoocompiler.core.classes import check_classes
from zoocompiler.core.deploy import TARGET_ROUND_TO, DeployOptions, round_to_for
from zoocompiler.core.errors import ZooError

HEADS = ("slice", "new")
SEMANTICS = ("gated", "static", "calibrated")  # mirror passes.rewrite.mask_generators' (that module imports torch)
RESIDUAL_LAYOUTS = ("pad", "union")
REUSE_RUNS = 30  # timed ONNX Runtime runs of reuse's files (batch 1, and each cell of the module's latency table)


def _check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0 < threshold <= 1):
        raise ZooError(f"threshold {threshold} is outside (0, 1]",
                       "pass --threshold in (0, 1], e.g. 0.9 (the paper's τ)")


def _check_cut(semantics: str, residual: str, round_to: int | None, target: str | None) -> None:
    if semantics not in SEMANTICS:
        raise ZooError(f"unknown module semantics '{semantics}'", f"use one of: {', '.join(SEMANTICS)}")
    if residual not in RESIDUAL_LAYOUTS:
        raise ZooError(f"unknown residual layout '{residual}'", f"use one of: {', '.join(RESIDUAL_LAYOUTS)}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ZooError(f"bad --round-to {round_to}", "pass 1 (the exact kernel sets) or a channel multiple such as 8")
    if target is not None and target not in TARGET_ROUND_TO:
        raise ZooError(f"unknown --target {target!r}", f"use one of: {', '.join(TARGET_ROUND_TO)}")


class _CutOptions:
    """``round_to`` (``None``: the ``target``'s default) and ``deploy`` of a config that cuts modules."""

    round_to: int | None
    target: str | None
    deploy: DeployOptions

    def rounding(self) -> tuple[int, str]:
        """The channel multiple modules are rounded to (1: exact kernel sets) and why: ``--round-to`` when given,
        else ``--target``'s default (``core.deploy.round_to_for``: gpu 8, cpu 16, any none; the target
        ``--precision`` implies when ``--target`` is not given: fp16 gpu, int8 cpu, fp32 any)."""
        value, reason = round_to_for(self.deploy.precision, self.target, self.round_to)
        return value or 1, reason


@dataclass
class ModularizeTrainConfig:
    """What ``zoocompile modularize train`` does (defaults: the paper's α = 0.5, β = 1.5)."""

    spec: str
    data: str = "mnist5k"
    alpha: float = 0.5
    beta: float = 1.5
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 128
    weight_decay: float = 0.05
    from_scratch: bool = False
    checkpoint: str | None = None
    allow_pickle: bool = False  # a pickled --checkpoint may run code: only for files the user trusts
    standard: bool = True  # also train the standard model (same epochs) the tables compare with
    seed: int = 0

    def check(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ZooError(f"{name} must be a finite number >= 0, got {value}",
                               f"pass --{name} >= 0 (the paper: alpha 0.5, beta 1.5)")
        if self.epochs < 1 or self.batch_size < 2 or not (math.isfinite(self.lr) and self.lr > 0):
            raise ZooError("epochs and learning rate must be positive and the batch size at least 2",
                           "fix --epochs/--batch-size/--lr (the losses compare samples within a batch)")


@dataclass
class ModularizeExtractConfig(_CutOptions):
    """What ``zoocompile modularize extract`` does: one module per class at threshold τ, written at
    ``deploy.precision`` (int8: calibrated on the class's training samples)."""

    threshold: float = 0.9
    semantics: str = "gated"
    residual: str = "pad"  # multi-producer groups: each producer keeps its own kernels (pad) or the union
    round_to: int | None = None  # grow kept sets to a multiple of this (8: GPU fp16; None: the target's default)
    target: str | None = None  # gpu | cpu | any: the round_to default (None: the one deploy.precision implies)
    trust_code: bool = False
    deploy: DeployOptions = field(default_factory=DeployOptions)

    def check(self) -> None:
        _check_threshold(self.threshold)
        _check_cut(self.semantics, self.residual, self.round_to, self.target)
        self.deploy.check()


@dataclass
class ModularizeReuseConfig(_CutOptions):
    """What ``zoocompile modularize reuse`` does: the mixed module of ``classes`` with a new or sliced head,
    written (with the whole model) at ``deploy.precision``; ``round_to``/``target`` as for extract."""

    classes: list[int] = field(default_factory=list)
    head: str = "slice"
    finetune_epochs: int = 5
    lr: float = 1e-3
    threshold: float = 0.9
    semantics: str = "gated"
    residual: str = "pad"
    round_to: int | None = None
    target: str | None = None
    runs: int = REUSE_RUNS  # timed ONNX Runtime runs at batch 1 (of the written files)
    seed: int = 0
    trust_code: bool = False
    # deploy.latency_runs: timed runs per cell of the module's latency table (the CLI's --runs sets both)
    deploy: DeployOptions = field(default_factory=lambda: DeployOptions(latency_runs=REUSE_RUNS))

    def check(self) -> None:
        check_classes(list(self.classes))
        _check_threshold(self.threshold)
        _check_cut(self.semantics, self.residual, self.round_to, self.target)
        if self.head not in HEADS:
            raise ZooError(f"unknown head '{self.head}'", f"use one of: {', '.join(HEADS)}")
        if self.finetune_epochs < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise ZooError("fine-tuning epochs and learning rate must be positive", "fix --finetune-epochs/--lr")
        if self.runs < 1:
            raise ZooError(f"bad --runs {self.runs}", "pass a positive number of timed runs, e.g. 30")
        self.deploy.check()
