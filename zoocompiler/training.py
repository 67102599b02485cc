"""A small, seeded train/evaluate loop for any ``nn.Module`` classifier on a :class:`DataSplit`.

``train`` runs AdamW with a OneCycle (default) or cosine schedule, optional ±2 px random-shift
augmentation and a tqdm progress bar. With the same seed, thread count and machine it produces
bit-identical weights: it seeds python/numpy/torch, fixes ``torch.set_num_threads`` (default 1) for
its duration, and draws shuffling and augmentation from dedicated seeded generators.

Pipelines that need another objective (random slice rates, extra losses) pass ``loss_fn``.

Divergence stops a run: a non-finite loss (checked every step, before the update), non-finite
weights (checked after every epoch) or non-finite outputs in :func:`evaluate` raise
:class:`~zoocompiler.core.errors.TrainingError` naming the epoch (and step) and the likely cause.

Data-parallel: inside ``with sharded(Shard(rank, world)):`` (a process of an initialised ``torch.distributed``
group; ``pipelines.data_parallel`` sets it on each Ray Train worker) ``train`` runs the same loop on every process
— same seed, same global batches, same augmentation draws, same random choices in ``loss_fn`` — but each process
computes the loss on its slice ``[rank]`` of every global batch (``torch.tensor_split``) through
``DistributedDataParallel``, which averages the gradients. Each shard's loss is weighted by
``shard size × world / batch size`` (1 when the batch divides evenly), so for a loss that is a mean over samples the
update equals single-process training up to floating point; batch statistics (BatchNorm, losses over sample pairs)
are per shard. The logged loss and accuracy are all-reduced over the global batch, so a non-finite loss stops every
process at the same step.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .core.errors import TrainingError, ZooError
from .core.modules import eval_mode, nonfinite_weights
from .data import DataSplit

# One intra-op thread by default: results do not depend on the machine's core count, and small models gain
# little from more threads (on an oversubscribed CPU, OpenMP barriers make 2 threads several times slower).
DEFAULT_THREADS = 1
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
DIVERGED_FIX = "retrain with a lower learning rate, or check the data for NaN/inf values"


@dataclass
class EpochStats:
    """Metrics of one epoch: mean training loss, training accuracy (on augmented batches), eval accuracy."""

    epoch: int
    loss: float
    train_accuracy: float
    eval_accuracy: float | None
    lr: float
    seconds: float


@dataclass
class History:
    """What ``train`` did: per-epoch stats and the total wall time."""

    epochs: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.epochs[-1].loss if self.epochs else math.nan


@dataclass(frozen=True)
class Shard:
    """This process's part of data-parallel training: rank ``rank`` of ``world`` processes of the initialised
    ``torch.distributed`` group."""

    rank: int
    world: int

    def take(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
        return torch.tensor_split(batch, self.world)[self.rank]

    def check_batch(self, smallest: int) -> None:
        """``ZooError`` when a global batch of ``smallest`` samples leaves a process without samples."""
        if smallest < self.world:
            raise ZooError(f"--workers {self.world} is more than the {smallest} samples of a training batch: "
                           "every worker needs a part of every batch", f"pass --workers {smallest} or fewer")

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (unused parameters allowed: a loss may run part of the model)."""
        return _Replica(model, find_unused_parameters=True)

    def reduce(self, loss: torch.Tensor, samples: int, correct: int) -> tuple[torch.Tensor, int]:
        """(the global batch's mean loss, its correct predictions) from every rank's mean ``loss`` over its
        ``samples`` and its ``correct``."""
        import torch.distributed as dist

        sums = torch.stack([loss.detach().double().sum() * samples, torch.tensor(float(samples), dtype=torch.float64),
                            torch.tensor(float(correct), dtype=torch.float64)])
        dist.all_reduce(sums)
        return sums[0] / sums[1], int(sums[2])


class _Replica(DistributedDataParallel):
    """DistributedDataParallel that reads attributes it lacks from the wrapped module (a ``loss_fn`` may read
    e.g. ``model.depth``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


_SHARD: ContextVar[Shard | None] = ContextVar("zoocompiler_training_shard", default=None)


@contextlib.contextmanager
def sharded(shard: Shard) -> Iterator[None]:
    """Every :func:`train` in the block trains data-parallel as ``shard`` (see the module docstring)."""
    token = _SHARD.set(shard)
    try:
        yield
    finally:
        _SHARD.reset(token)


def current_shard() -> Shard | None:
    """The :class:`Shard` of the enclosing :func:`sharded` block; None in ordinary (single-process) training."""
    return _SHARD.get()


def gather(obj: Any) -> list[Any]:
    """``[obj]``, or in a :func:`sharded` block every process's ``obj`` in rank order (a collective: every
    process must call it, e.g. from ``on_epoch``)."""
    shard = current_shard()
    if shard is None:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * shard.world
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (no change when None), then restore."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def random_shift(max_shift: int = 2) -> Augment:
    """Augmentation: translate each image by an integer offset in [-max_shift, max_shift]² (edge-replicated)."""

    def shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = F.pad(x, (max_shift,) * 4, mode="replicate")
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # n×1×h×1
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # n×1×1×w
        batch = torch.arange(n)[:, None, None, None]
        chans = torch.arange(x.shape[1])[None, :, None, None]
        return padded[batch, chans, rows, cols]

    return shift


def _nonfinite_data(data: torch.Tensor | None) -> str | None:
    """Describe the NaN/inf in ``data`` (N×...), e.g. "12 non-finite values in 3 samples"; None when all finite."""
    if data is None or not (data.is_floating_point() or data.is_complex()):
        return None
    bad = ~torch.isfinite(data)
    n = int(bad.sum())
    if not n:
        return None
    samples = int(bad.reshape(len(data), -1).any(1).sum()) if data.dim() > 1 else n
    return f"{n:,} non-finite value{'s' if n > 1 else ''} in {samples:,} sample{'s' if samples > 1 else ''}"


def _diverged(where: str, what: str, lr: float | None, data: torch.Tensor | None) -> TrainingError:
    """The error for a run that diverged: blames the data when it holds NaN/inf, else the learning rate."""
    in_data = _nonfinite_data(data)
    if in_data is not None:
        return TrainingError(
            f"{where}: {what}; the training data has {in_data}", "remove or replace the NaN/inf values in the data"
        )
    rate = f"the learning rate {lr:g} is likely too high" if lr is not None else "the learning rate is likely too high"
    return TrainingError(f"{where}: {what} ({rate})", DIVERGED_FIX)


def check_finite_loss(
    loss: torch.Tensor, epoch: int, step: int, *, lr: float | None = None, data: torch.Tensor | None = None
) -> float:
    """``loss`` as a float; raises :class:`TrainingError` naming ``epoch`` and ``step`` (1-based) when it is
    NaN or inf. The message blames the data when ``data`` (the training inputs) holds NaN/inf, else
    the learning rate ``lr``. Every training loop calls this once per step, before ``backward``."""
    value = float(loss.detach().float().sum()) if loss.numel() != 1 else float(loss.item())
    if math.isfinite(value):
        return value
    where = f"training diverged at epoch {epoch}, step {step}"
    if epoch == 1 and step == 1 and _nonfinite_data(data) is None:  # no update yet: not the learning rate
        raise TrainingError(
            f"{where}: the loss is {value} before any update (the model overflows on this data)",
            "check the model's initial weights and ops that can overflow (exp, log, division)",
        )
    raise _diverged(where, f"the loss is {value}", lr, data)


def check_finite_weights(
    model: nn.Module, epoch: int, *, lr: float | None = None, data: torch.Tensor | None = None
) -> None:
    """Raise :class:`TrainingError` naming ``epoch`` when ``model``'s parameters or buffers hold NaN or inf
    (e.g. a last update that overflowed, or weights no step's loss depends on)."""
    where = nonfinite_weights(model)
    if where is not None:
        raise _diverged(f"training diverged in epoch {epoch}", f"the weights became non-finite ({where})", lr, data)


def train(
    model: nn.Module,
    train_split: DataSplit,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    augment: bool | Augment = False,
    weight_decay: float = 0.05,
    schedule: str = "onecycle",
    label_smoothing: float = 0.0,
    loss_fn: LossFn | None = None,
    eval_split: DataSplit | None = None,
    max_steps: int | None = None,
    threads: int | None = DEFAULT_THREADS,
    desc: str = "train",
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> History:
    """Train ``model`` in place on ``train_split`` and return its :class:`History`.

    AdamW over the parameters that require grad; ``schedule`` is "onecycle" (peak ``lr``) or
    "cosine" (from ``lr`` to 0). ``augment=True`` applies ±2 px random shifts. ``loss_fn(model, x, y)``
    replaces the cross-entropy objective. ``eval_split`` adds per-epoch eval accuracy;
    ``max_steps`` stops early (tests); ``on_epoch`` is called with each epoch's stats. Leaves the
    model in eval mode. A non-finite loss or weights raise :class:`TrainingError` (see the module
    docstring); the model is then left with the weights it had when the run stopped. In a :func:`sharded`
    block ``loss_fn`` gets the DistributedDataParallel wrapper and this rank's slice of the batch, and no
    progress bar is shown.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if schedule not in ("onecycle", "cosine"):
        raise ValueError(f"schedule must be 'onecycle' or 'cosine', got {schedule!r}")
    shift = random_shift() if augment is True else (augment or None)
    drop_last = len(train_split) > batch_size  # avoid a size-1 last batch (BatchNorm)
    shard = current_shard()
    if shard is not None:
        shard.check_batch(min(batch_size, len(train_split)))
    history = History()
    start = time.perf_counter()
    initial = nonfinite_weights(model)
    if initial is not None:
        raise TrainingError(
            f"cannot train: the model has non-finite weights before training ({initial})",
            "load or initialise finite weights (a diverged checkpoint cannot be trained further)",
        )
    with fixed_threads(threads):
        seed_everything(seed)
        loader = train_split.loader(batch_size, shuffle=True, seed=seed, drop_last=drop_last)
        aug_generator = torch.Generator().manual_seed(seed + 1)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        total_steps = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
        scheduler = _scheduler(optimizer, schedule, lr, total_steps)
        net = model if shard is None else shard.wrap(model)
        step = 0
        bar = tqdm(total=total_steps, desc=desc, disable=not progress or shard is not None, leave=False, unit="step")
        try:
            for epoch in range(epochs):
                model.train()
                t0 = time.perf_counter()
                loss_sum, correct, seen = 0.0, 0, 0
                for epoch_step, (x, y) in enumerate(loader, start=1):
                    if step >= total_steps:
                        break
                    if shift is not None:
                        x = shift(x, aug_generator)  # on the global batch: the same draws as single-process
                    samples = len(y)
                    if shard is not None:
                        x, y = shard.take(x), shard.take(y)
                    optimizer.zero_grad(set_to_none=True)
                    step_correct = 0
                    if loss_fn is None:
                        logits = net(x)
                        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
                        step_correct = int((logits.argmax(1) == y).sum())
                    else:
                        loss = loss_fn(net, x, y)
                    global_loss = loss
                    if shard is not None:
                        global_loss, step_correct = shard.reduce(loss, len(y), step_correct)
                        if len(y) * shard.world != samples:  # uneven shards: DDP's mean of shard means, reweighted
                            loss = loss * (len(y) * shard.world / samples)
                    loss_value = check_finite_loss(global_loss, epoch + 1, epoch_step, lr=lr, data=train_split.x)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    correct += step_correct
                    loss_sum += loss_value * samples
                    seen += samples
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.3f}")
                check_finite_weights(model, epoch + 1, lr=lr, data=train_split.x)
                eval_acc = evaluate(model, eval_split, threads=None) if eval_split is not None else None
                stats = EpochStats(
                    epoch=epoch + 1,
                    loss=loss_sum / max(seen, 1),
                    train_accuracy=correct / max(seen, 1) if loss_fn is None else math.nan,
                    eval_accuracy=eval_acc,
                    lr=optimizer.param_groups[0]["lr"],
                    seconds=time.perf_counter() - t0,
                )
                history.epochs.append(stats)
                if on_epoch is not None:
                    on_epoch(stats)
                if step >= total_steps:
                    break
        finally:
            bar.close()
            model.eval()
    history.seconds = time.perf_counter() - start
    return history


def _scheduler(optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int):
    if schedule == "onecycle":
        # at least 10 steps: OneCycleLR divides by its warm-up length, which rounds to 0 below 10 steps at 20%
        steps = max(total_steps, 10)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.2)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))


@torch.no_grad()
def predict_logits(
    model: nn.Module, split: DataSplit, batch_size: int = 500, threads: int | None = None
) -> torch.Tensor:
    """Logits of ``model`` (run in eval mode, training flag restored) on every sample of ``split``."""
    with eval_mode(model), fixed_threads(threads):
        outputs = [model(x) for x, _ in split.loader(batch_size, shuffle=False)]
    return torch.cat(outputs) if outputs else torch.zeros(0, split.num_classes)


def check_finite_outputs(model: nn.Module, outputs: torch.Tensor, split: DataSplit) -> None:
    """Raise :class:`TrainingError` when ``outputs`` (``model``'s, on ``split``) hold NaN or inf: an accuracy
    computed from them (argmax of NaN) would be meaningless. Names the likely cause: non-finite weights
    (a diverged training), NaN/inf in the data, or else values that overflow in the model."""
    bad = ~torch.isfinite(outputs)
    if not bool(bad.any()):
        return
    rows = int(bad.reshape(len(outputs), -1).any(1).sum()) if outputs.dim() > 1 else int(bad.sum())
    what = f"the model's outputs on '{split.name}' are non-finite for {rows:,} of {len(outputs):,} samples"
    in_data = _nonfinite_data(split.x)
    if in_data is not None:
        raise TrainingError(f"{what}: the data has {in_data}", "remove or replace the NaN/inf values in the data")
    weights = nonfinite_weights(model)
    if weights is not None:
        raise TrainingError(f"{what}: the model has non-finite weights ({weights})", DIVERGED_FIX)
    raise TrainingError(f"{what}, with finite weights and data (values overflow inside the model)", DIVERGED_FIX)


def evaluate(model: nn.Module, split: DataSplit, batch_size: int = 500, threads: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``split`` as a fraction in [0, 1]. Non-finite outputs raise
    :class:`TrainingError` instead of an accuracy (see :func:`check_finite_outputs`)."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    logits = predict_logits(model, split, batch_size, threads)
    check_finite_outputs(model, logits, split)
    return int((logits.argmax(1) == split.y).sum()) / len(split)  # exact ratio, not a float32 mean


def full_batch_steps(
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    *,
    weight_decay: float = 0.0,
    data: torch.Tensor | None = None,
) -> list[float]:
    """``steps`` Adam updates of ``params`` on ``loss_fn()`` (the whole few-shot batch each step); the losses.
    A NaN/inf loss raises :class:`TrainingError` (blaming ``data`` when it holds NaN/inf)."""
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        loss = loss_fn()
        losses.append(check_finite_loss(loss, 1, step + 1, lr=lr, data=data))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses
