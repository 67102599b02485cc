"""The options of ``zoocompile slice train``; torch-free, so the CLI reads its defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import ZooError
from zoocompiler.core.rates import DEFAULT_GROUPS

EXECUTIONS = ("masked", "views")  # as passes.rewrite.slicing.EXECUTIONS, without importing torch


def check_training(scheduler: str, distill: bool) -> None:
    """``ZooError`` for in-place distillation without the sandwich rule (no full-width pass in the batch to
    learn from)."""
    if distill and scheduler != "sandwich":
        raise ZooError("in-place distillation needs the full width in every batch",
                       "use --scheduler sandwich with --distill, or drop --distill")


@dataclass
class SliceTrainConfig:
    """What ``zoocompile slice train`` does (lb 0.375 as the paper; the sandwich rule, which beat the paper's
    schedulers at r <= 0.5 without losing at r = 1 in docs/bench_slice.md)."""

    spec: str
    data: str = "mnist5k"
    lb: float = 0.375
    groups: int = DEFAULT_GROUPS
    scheduler: str = "sandwich"
    scheduler_options: dict[str, float] = field(default_factory=dict)
    rescale: str = "dense"
    sort_by: str | None = None
    from_scratch: bool = False
    checkpoint: str | None = None
    allow_pickle: bool = False  # a pickled --checkpoint may run code: only for files the user trusts
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 128
    weight_decay: float = 0.05
    augment: bool = True
    seed: int = 0
    execution: str = "views"  # each subnet's own graph on weight slices ("masked": the full-width graph)
    distill: bool = False  # sandwich only: rates below 1 learn from the full width's predictions

    def check(self) -> None:
        """Raise ``ZooError`` for options that cannot work, before anything slow runs."""
        from zoocompiler.solvers.slice_rates import SCHEDULERS, make_scheduler, valid_rates  # scipy: not for --help

        if self.scheduler not in SCHEDULERS:
            raise ZooError(f"unknown scheduler '{self.scheduler}'", f"use one of: {', '.join(SCHEDULERS)}")
        if not 0 < self.lb <= 1:
            raise ZooError(f"lower bound {self.lb:g} is outside (0, 1]", "pass --lb in (0, 1], e.g. 0.375")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ZooError("epochs, batch size and learning rate must be positive", "fix --epochs/--batch-size/--lr")
        if self.groups < 1:
            raise ZooError(f"groups must be >= 1, got {self.groups}", "pass --groups 16 (rates in steps of 1/16)")
        if self.execution not in EXECUTIONS:
            raise ZooError(f"unknown execution '{self.execution}'", f"use one of: {', '.join(EXECUTIONS)}")
        make_scheduler(self.scheduler, valid_rates(self.groups, self.lb), **self.scheduler_options)  # its options
        check_training(self.scheduler, self.distill)


@dataclass
class SliceExportConfig:
    """The options of ``zoocompile slice export`` that have defaults (rates and budgets have none)."""

    latency_batch: int = 32  # batch of the per-sample time t(r) that ElasticModel uses
    runs: int = 30  # timed ONNX Runtime runs at batch 1
    deploy: DeployOptions = field(default_factory=DeployOptions)  # every rate's precision (docs/deploy.md)

    def check(self) -> None:
        """Raise ``ZooError`` for options that cannot work, before anything slow runs."""
        if self.latency_batch < 1:
            raise ZooError(f"bad --latency-batch {self.latency_batch}", "pass a positive batch size, e.g. 32")
        if self.runs < 1:
            raise ZooError(f"bad --runs {self.runs}", "pass a positive number of timed runs, e.g. 30")
        self.deploy.check()
