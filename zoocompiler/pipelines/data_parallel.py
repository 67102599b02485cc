"""Data-parallel training (``--workers N``): one network trained on N processes with Ray Train's ``TorchTrainer``.

:func:`run_data_parallel` runs ``body()`` — a function that trains ``module`` in place through
:func:`zoocompiler.training.train`, e.g. a pipeline's whole training stage — on ``N`` Ray Train workers
(``ScalingConfig(num_workers=N, use_gpu=False)``, DistributedDataParallel over gloo). Every worker gets the same
sealed copy of ``module`` and ``body`` (``transport.seal``, through Ray's object store) and runs ``body`` inside
``training.sharded``: each ``train`` call sees the same global batches as single-process training and computes
its 1/N slice of each, DDP averaging the gradients, so the weights equal single-process training with the same
global batch up to floating point (batch statistics — BatchNorm, losses over sample pairs — are per slice; see
``zoocompiler.training``). Rank 0 sends ``body``'s return value and ``module``'s state dict back sealed to a
small actor the driver owns (no shared filesystem, no checkpoint upload); the driver checks the sha256, loads the
weights into its own ``module`` and returns the value, and the pipeline goes on as in-process.

``workers=1`` is exactly in-process training: ``body()`` is called here, Ray is never imported. With more, the
Ray instance already initialised in this process is used (a cluster joined with ``--executor ray=ADDRESS``), else
a local one is started with at least N CPUs. Ray Train's storage path is a temporary directory, removed
afterwards (nothing is checkpointed there; the output directory is never used). A worker's error (a non-finite
loss: ``TrainingError``) ends the run with that error's one line; the run is not retried
(``FailureConfig(max_failures=0)``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from zoocompiler.core.errors import ZooError

from .executors import RAY_HINT, RayExecutor
from .transport import Sealed, seal, unseal

if TYPE_CHECKING:
    from torch import nn

R = TypeVar("R")

WORKERS_HELP = ("data-parallel training on N Ray Train workers (DDP, gloo on CPU): each takes 1/N of every batch; "
                "1 = in-process")
RUN_NAME = "zoocompiler-data-parallel"


def check_workers(workers: Any, batch_size: int | None = None) -> int:
    """``workers`` when it is an int ≥ 1 (and, with ``batch_size``, at most the batch size) and Ray is installed
    for more than one; otherwise a one-line ``ZooError``. Cheap: Ray is looked up, not imported."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ZooError(f"bad --workers {workers!r}: need an integer >= 1",
                       "pass --workers 1 (in-process) or the number of data-parallel workers, e.g. 2")
    if batch_size is not None and workers > batch_size:
        raise ZooError(f"--workers {workers} is more than the batch size {batch_size}: every worker needs a part "
                       "of every batch", f"pass --workers {batch_size} or fewer, or a larger --batch-size")
    if workers > 1 and importlib.util.find_spec("ray") is None:
        raise ZooError(f"--workers {workers} trains on Ray Train, which is not installed", RAY_HINT)
    return workers


def run_data_parallel(module: nn.Module, body: Callable[[], R], workers: int = 1) -> R:
    """``body()``, which trains ``module`` in place; with ``workers`` > 1 on that many Ray Train workers (see the
    module docstring), after which ``module`` holds rank 0's trained weights and training flag. Returns rank 0's
    ``body()``."""
    check_workers(workers)
    if workers == 1:
        return body()
    ray = _connect(workers)
    from ray.train.torch import TorchConfig, TorchTrainer

    inbox = ray.remote(num_cpus=0)(_Inbox).remote()
    storage = tempfile.mkdtemp(prefix="zoocompiler-ddp-")
    try:
        scaling, run = _configs(workers, storage)
        trainer = TorchTrainer(_worker_loop, train_loop_config={"job": ray.put(seal((module, body))), "inbox": inbox},
                               scaling_config=scaling, torch_config=TorchConfig(backend="gloo"), run_config=run)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # Ray Train's own lines; stdout may carry --json
                trainer.fit()
        except Exception as err:  # Ray Train's error classes differ between its versions
            raise _failure(err, workers) from err
        sealed = ray.get(inbox.take.remote())
    finally:
        ray.kill(inbox)
        shutil.rmtree(storage, ignore_errors=True)
    if sealed is None:
        raise ZooError(f"data-parallel training on {workers} Ray workers returned no weights",
                       "rerun with --workers 1; report this bug")
    result, state, training = unseal(sealed, "the trained weights from Ray Train worker 0")
    module.load_state_dict(state)
    module.train(training)
    return result


def _connect(workers: int):
    """The Ray module, initialised (a local instance with at least ``workers`` CPUs unless one is running), with
    ``workers`` CPUs in the cluster."""
    ray = RayExecutor(num_cpus=max(workers, os.cpu_count() or 1)).connect()
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < workers:
        raise ZooError(f"--workers {workers} needs {workers} CPUs but the Ray cluster has {cpus}",
                       f"pass --workers {max(cpus, 1)} or fewer, or add nodes to the cluster")
    return ray


def _configs(workers: int, storage: str) -> tuple[Any, Any]:
    """``ScalingConfig(num_workers=workers, use_gpu=False)`` and the ``RunConfig`` (``storage``, no retry). On Ray
    Train v1 (the default before Ray 2.5x) the coordinator also gets no CPU (its default 1 would keep N workers off
    N CPUs) and nothing is printed (``verbose=0``: stdout may carry ``--json``); v2 refuses those v1 options with a
    ``DeprecationWarning`` and needs neither."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    common = {"name": RUN_NAME, "storage_path": storage, "failure_config": FailureConfig(max_failures=0)}
    try:
        return (ScalingConfig(num_workers=workers, use_gpu=False, trainer_resources={"CPU": 0}),
                RunConfig(verbose=0, **common))
    except DeprecationWarning:
        return ScalingConfig(num_workers=workers, use_gpu=False), RunConfig(**common)


class _Inbox:
    """A Ray actor holding rank 0's sealed result until the driver takes it."""

    def __init__(self) -> None:
        self.sealed: Sealed | None = None

    def put(self, sealed: Sealed) -> None:
        self.sealed = sealed

    def take(self) -> Sealed | None:
        return self.sealed


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: ``body()`` as this rank's shard; rank 0 sends (result, state dict, training flag)."""
    import ray
    import torch.distributed as dist

    from zoocompiler.training import Shard, sharded

    module, body = unseal(ray.get(config["job"]), "the data-parallel training job")
    shard = Shard(dist.get_rank(), dist.get_world_size())
    with sharded(shard):
        result = body()
    if shard.rank == 0:
        ray.get(config["inbox"].put.remote(seal((result, module.state_dict(), module.training))))


def _causes(err: BaseException) -> list[BaseException]:
    """A failed run's worker errors (Ray Train v2: by rank) and its chain of causes (v1 wraps the worker's error)."""
    failures = getattr(err, "worker_failures", None) or {}
    out = [failures[rank] for rank in sorted(failures)]
    current: Any = err
    while isinstance(current, BaseException) and all(current is not c for c in out):
        out.append(current)
        inner = getattr(current, "cause", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__
    return out


def _failure(err: Exception, workers: int) -> ZooError:
    """The one-line error for a failed run: a worker's own ``ZooError`` (lowest rank first) when there is one."""
    causes = _causes(err)
    for cause in causes:
        if isinstance(cause, ZooError) and "\n" not in str(cause):
            return cause
    first = causes[0]
    text = str(first).strip().splitlines()
    return ZooError(f"data-parallel training on {workers} Ray workers failed: {type(first).__name__}: "
                    f"{text[-1][:200] if text else ''}", "rerun with --workers 1 to see the error in-process")
