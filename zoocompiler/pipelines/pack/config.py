"""The options of ``zoocompile pack slice | build | list``; torch-free, so the CLI reads its defaults without
importing torch. ``check()`` raises ``ZooError`` before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from zoocompiler.core.classes import check_classes
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import ZooError

SELECTIONS = ("threshold", "rate")
DEFAULT_BETA = {"threshold": 0.7, "rate": 0.4}  # measured in docs/bench_pack.md: fragments of 5-25% params
BUILD_RUNS = 30  # timed ONNX Runtime runs of the packed model (batch 1, and each cell of the latency table)


def check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and 0 < beta <= 1):
        raise ZooError(f"beta {beta} is outside (0, 1]",
                       "pass --beta in (0, 1] (threshold: keep units above (1 - beta) of the best; rate: the top beta)")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ZooError(f"{name} must be a positive number, got {value}", f"pass --{name.replace('_', '-')} > 0")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ZooError(f"{name} must be a finite number >= 0, got {value}", f"pass --{name} >= 0")


@dataclass
class PackSliceConfig:
    """What ``zoocompile pack slice`` does: ``k`` samples per class of every source, one fragment per
    (source, class). ``zoo``: ``pack`` (the demo source zoo) or comma-separated zoo model names.
    ``beta=None``: :data:`DEFAULT_BETA` of the selection. ``deploy``: the fragments' ONNX precision (int8:
    calibrated on the source's training split); no latency table (``runs`` times each written file)."""

    zoo: str = "pack"
    data: str = "mnist5k"
    k: int = 10
    select: str = "threshold"
    beta: float | None = None
    alpha: float = 0.2
    gamma: float = 1.0
    steps: int = 20
    lr: float = 1e-3
    seed: int = 0
    runs: int = 0  # timed ONNX Runtime runs per fragment (0: not timed)
    # the CLI's --runs also fills deploy.latency_runs; fragments get no latency table either way
    deploy: DeployOptions = field(default_factory=lambda: DeployOptions(latency_runs=0))

    @property
    def resolved_beta(self) -> float:
        return DEFAULT_BETA.get(self.select, 0.5) if self.beta is None else self.beta

    def check(self) -> None:
        if self.select not in SELECTIONS:
            raise ZooError(f"unknown selection '{self.select}'", f"use one of: {', '.join(SELECTIONS)}")
        check_beta(self.resolved_beta)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ZooError(f"k must be a positive integer, got {self.k!r}", "pass --k 5, 10 or 20 (samples per class)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ZooError(f"steps must be a positive integer, got {self.steps!r}", "pass --steps, e.g. 20")
        _check_non_negative(alpha=self.alpha, gamma=self.gamma)
        _check_positive(lr=self.lr)
        if self.runs < 0:
            raise ZooError(f"bad --runs {self.runs}", "pass 0 (no timing) or a number of timed runs")
        self.deploy.check()

    def settings(self) -> dict:
        """The options a store records and every later slice into it must repeat."""
        return {"data": self.data, "k": self.k, "select": self.select, "beta": self.resolved_beta,
                "alpha": self.alpha, "gamma": self.gamma, "steps": self.steps, "lr": self.lr, "seed": self.seed}


@dataclass
class PackBuildConfig:
    """What ``zoocompile pack build`` does: pack the fragments of ``classes`` (δ = ``delta``; encoder
    ``width`` 0 = 32 per class), export one ONNX graph at ``deploy.precision`` (int8: calibrated on those
    classes' training split), time it (``runs``; ``deploy``: the per-precision latency table) and test it."""

    classes: list[int] = field(default_factory=list)
    delta: float = 1.0
    width: int = 0
    steps: int = 300
    lr: float = 1e-2
    seed: int = 0
    runs: int = BUILD_RUNS
    # deploy.latency_runs: timed runs per cell of the latency table (the CLI's --runs sets both)
    deploy: DeployOptions = field(default_factory=lambda: DeployOptions(latency_runs=BUILD_RUNS))

    def check(self) -> None:
        check_classes(list(self.classes))
        _check_non_negative(delta=self.delta)
        _check_positive(lr=self.lr)
        if self.width < 0 or self.steps < 1 or self.runs < 1:
            raise ZooError("width must be >= 0 and steps and runs positive", "fix --width/--steps/--runs")
        self.deploy.check()
