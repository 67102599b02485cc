"""The options of DeRy's reassembly (``zoocompile assemble``/``partition``); torch-free, so the CLI reads its
defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zoocompiler.core.atomic import check_writable_parent
from zoocompiler.core.budget import Budget
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.core.errors import ZooError

TUNE_MODES = ("frozen", "full", "none")
POOL_MODES = ("auto", "mean", "flatten")  # passes.analysis.activations.POOL_MODES (torch-free copy)
PROXIES = ("probe", "naswot")  # linear-probe accuracy on held-out data; NASWOT (training-free)


@dataclass
class AssembleConfig:
    """Every option of ``zoocompile assemble`` (paper: K=4, ε=0.2, R=200; the target is ``digits`` at the zoo's
    28×28, a task none of the demo zoo was trained on: see docs/assemble.md)."""

    budget: Budget
    zoo: str = "demo"
    data: str = "digits"
    image_size: int | None = None  # None: the zoo's declared input size (pipelines/assemble/task.py)
    train_size: int | None = None  # limit the target's training split (stratified, fixed seed)
    val_fraction: float = 0.2  # held-out part of the training data: proxy, quality and every selection
    k: int = 4
    eps: float = 0.2
    restarts: int = 200
    distinct_sets: bool = True  # each model's K blocks in K different sets (solvers.partition, distinct=True)
    size: str = "params"
    top: int = 20
    proxy: str = "probe"
    tune_top: int = 3  # candidates tuned (best proxy first); the best on val is chosen
    baselines: bool = True  # also tune the best single zoo model and a from-scratch twin
    tune: str = "full"
    epochs: int = 5
    lr: float = 1e-3
    seed: int = 0
    probe_fraction: float = 0.05
    naswot_batches: int = 5
    naswot_batch_size: int = 32
    pool: str = "auto"
    unbiased_cka: bool = False
    cache_dir: Path | None = None
    latency_runs: int = 30  # the written model.onnx's batch-1 latency (the latency budget's check) and each block's
    deploy: DeployOptions = field(default_factory=DeployOptions)  # model.onnx's precision (docs/deploy.md)

    def check(self) -> None:
        self.deploy.check()
        if self.tune not in TUNE_MODES:
            raise ZooError(f"unknown --tune {self.tune!r}", f"use one of: {', '.join(TUNE_MODES)}")
        if self.epochs < 1 and self.tune != "none":
            raise ZooError(f"--epochs must be >= 1, got {self.epochs}", "pass --epochs 3, or --tune none")
        if self.proxy not in PROXIES:
            raise ZooError(f"unknown --proxy {self.proxy!r}", f"use one of: {', '.join(PROXIES)}")
        if self.tune_top < 1:
            raise ZooError(f"--tune-top must be >= 1, got {self.tune_top}", "pass --tune-top 3")
        if not 0.0 < self.val_fraction < 1.0:
            raise ZooError(f"--val-fraction must be in (0, 1), got {self.val_fraction}", "pass e.g. 0.2")
        if self.image_size is not None and self.image_size < 1:
            raise ZooError(f"--image-size must be >= 1, got {self.image_size}", "pass e.g. 28, or leave it out")
        if self.top < 1:
            raise ZooError(f"--top must be >= 1, got {self.top}", "pass --top 20 (candidates to re-rank)")
        if not 0.0 < self.probe_fraction <= 1.0:
            raise ZooError(f"probe fraction must be in (0, 1], got {self.probe_fraction}", "pass e.g. 0.05")
        if self.cache_dir is not None:  # the user named it: it must work (the default cache degrades instead)
            if Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
                raise ZooError(f"--cache-dir {self.cache_dir} is a file", "pass a directory for --cache-dir")
            check_writable_parent(Path(self.cache_dir) / "similarity.npz", flag="--cache-dir")
