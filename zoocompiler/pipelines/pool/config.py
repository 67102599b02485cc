"""The options of ``zoocompile pool distill | finetune | build | list``; torch-free, so the CLI reads its
defaults without importing torch. ``check()`` raises ``ZooError`` before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from zoocompiler.core.budget import Budget
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import ZooError

DEFAULT_ANCESTRY = "zoo:vit_anc12"
INITS = ("ls", "tm", "random")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ZooError(f"{name} must be an integer >= {low}, got {value!r}",
                       f"pass --{name.replace('_', '-')} >= {low}")


def _check_number(name: str, value: object, low: float, high: float, *, open_low: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"in ({low}, {high}]" if open_low else f"in [{low}, {high}]"
        raise ZooError(f"{name} must be a number {bound}, got {value!r}", f"pass --{name.replace('_', '-')} {bound}")


def check_init(init: str) -> None:
    if init not in INITS:
        raise ZooError(f"unknown stitch init {init!r}",
                       "use tm (distillation's transformation matrices), ls (least squares, SN-Net) or random")


@dataclass
class PoolDistillConfig:
    """What ``zoocompile pool distill`` does (Learngene Pool, Algorithm 1 lines 1-10).

    The ancestry ``spec`` (+ ``checkpoint``) is distilled into two auxiliary models of ``blocks`` blocks
    (``None``: half the ancestry's), one at the ancestry's width and one at ``dim`` (``None``: a quarter),
    for ``epochs`` each with Eq. 8 (``alpha`` weighs the hard-label loss). Dense distillation takes
    ``levels`` blocks into the narrow model and ``wide_levels`` into the full-width one (``None``: 3, or
    every block of a shallower auxiliary; docs/pool.md has the measurement behind the second). Stitch
    layers start from ``init``; ``ls`` fits them on ``probe`` training images.
    """

    spec: str = DEFAULT_ANCESTRY
    checkpoint: str | None = None
    allow_pickle: bool = False
    data: str = "mnist5k"
    blocks: int | None = None
    dim: int | None = None
    levels: int | None = None
    wide_levels: int | None = None
    alpha: float = 0.5
    tau: float = 1.0
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 64
    init: str = "ls"  # measured best on the demo ancestry (docs/bench_pool.md); the paper's is tm
    probe: int = 256
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ZooError("no ancestry model given", f"pass a model spec, e.g. {DEFAULT_ANCESTRY}")
        for name, low in (("epochs", 1), ("batch_size", 2), ("probe", 2)):
            _check_int(name, getattr(self, name), low)
        for name in ("blocks", "dim", "levels", "wide_levels"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_number("alpha", self.alpha, 0.0, 1.0, open_low=False)
        _check_number("tau", self.tau, 0.0, 100.0)
        _check_number("lr", self.lr, 0.0, 10.0)
        check_init(self.init)

    def settings(self) -> dict:
        return {"data": self.data, "alpha": self.alpha, "tau": self.tau, "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "levels": self.levels, "wide_levels": self.wide_levels,
                "probe": self.probe, "seed": self.seed}


@dataclass
class PoolFinetuneConfig:
    """What ``zoocompile pool finetune`` does (Algorithm 1 lines 11-14): ``epochs`` of one randomly sampled
    path per step, CE + soft CE from the ancestry (``kd``) at temperature ``tau``."""

    epochs: int = 10
    lr: float = 5e-4
    batch_size: int = 64
    kd: bool = True
    tau: float = 1.0
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 2)
        _check_number("lr", self.lr, 0.0, 10.0)
        _check_number("tau", self.tau, 0.0, 100.0)


@dataclass
class PoolBuildConfig:
    """What ``zoocompile pool build`` does: measure every descendant (params, MACs, ONNX Runtime latency at
    ``batch`` over ``runs`` runs), pick the most accurate within ``budget`` and export it; ``export_all``
    also exports every descendant with an elastic-runtime manifest. ``deploy``: the precision of every ONNX file
    written (docs/deploy.md); the chosen descendant's report has the per-precision latency table."""

    budget: str | None = None
    export_all: bool = False
    runs: int = 30
    batch: int = 1
    threads: int = 1
    deploy: DeployOptions = field(default_factory=DeployOptions)

    def parsed_budget(self) -> Budget:
        return Budget() if self.budget is None else Budget.parse(self.budget)

    def check(self) -> None:
        self.parsed_budget()
        _check_int("runs", self.runs, 1)
        _check_int("batch", self.batch, 1)
        _check_int("threads", self.threads, 1)
        self.deploy.check()
