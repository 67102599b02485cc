"""The options of DeRy's reassembly (``zoocompile assemble``/``partition``); torch-free, so the CLI reads its
defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoocompiler.core.atomic import check_writable_parent
from zoocompiler.core.budget import Budget
from zoocompiler.core.errors import ZooError

TUNE_MODES = ("frozen", "full", "none")


@dataclass
class AssembleConfig:
    """Every option of ``zoocompile assemble`` (defaults: the paper's K=4, ε=0.2, R=200, NASWOT 5×32)."""

    budget: Budget
    zoo: str = "demo"
    data: str = "mnist5k"
    k: int = 4
    eps: float = 0.2
    restarts: int = 200
    distinct_sets: bool = False  # each model's K blocks in K different sets (solvers.partition, distinct=True)
    size: str = "params"
    top: int = 20
    tune: str = "frozen"
    epochs: int = 3
    lr: float = 1e-3
    seed: int = 0
    probe_fraction: float = 0.05
    naswot_batches: int = 5
    naswot_batch_size: int = 32
    pool: str = "mean"
    unbiased_cka: bool = False
    cache_dir: Path | None = None
    latency_runs: int = 30

    def check(self) -> None:
        if self.tune not in TUNE_MODES:
            raise ZooError(f"unknown --tune {self.tune!r}", f"use one of: {', '.join(TUNE_MODES)}")
        if self.epochs < 1 and self.tune != "none":
            raise ZooError(f"--epochs must be >= 1, got {self.epochs}", "pass --epochs 3, or --tune none")
        if self.top < 1:
            raise ZooError(f"--top must be >= 1, got {self.top}", "pass --top 20 (candidates to re-rank)")
        if not 0.0 < self.probe_fraction <= 1.0:
            raise ZooError(f"probe fraction must be in (0, 1], got {self.probe_fraction}", "pass e.g. 0.05")
        if self.cache_dir is not None:  # the user named it: it must work (the default cache degrades instead)
            if Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
                raise ZooError(f"--cache-dir {self.cache_dir} is a file", "pass a directory for --cache-dir")
            check_writable_parent(Path(self.cache_dir) / "similarity.npz", flag="--cache-dir")
