"""Deciding on the target task: tuning that keeps the better head, the from-scratch twin, Kendall τ.

Every decision reads the held-out ``val`` part of the target (``task.TargetTask``); ``test`` is only reported.

* :func:`tune_kept` — tune a network (FROZEN or FULL, ``pipeline.tune``) on ``fit`` and keep the tuned weights
  only if they beat the least-squares head it started from on ``val`` (frozen tuning for a few epochs can end
  below its own ridge head);
* :func:`from_scratch` — the same architecture with every module re-initialised and a new least-squares head:
  the "trained from scratch, same size" baseline, trained on all weights for the same epochs;
* :func:`kendall_tau` — SciPy's τ, ``None`` where it is undefined (fewer than two items, a constant ranking).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from zoocompiler.passes.rewrite.compose import AssembledNet, fit_head
from zoocompiler.training import evaluate

from .task import TargetTask


@dataclass
class TuneResult:
    """Accuracies of one tuned network: ``val_before`` with its ridge head, ``val_after`` tuned, ``kept`` the
    head that won on ``val`` ("tuned" or "ridge"; ties keep the tuned one), ``val`` and ``test`` of the kept."""

    val_before: float
    test_before: float
    val_after: float | None
    kept: str
    val: float
    test: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tune_kept(net: AssembledNet, task: TargetTask, tune_mode: str, tune_fn) -> TuneResult:
    """Tune ``net`` in place with ``tune_fn(net, fit_split)`` and keep the better of tuned and untuned on ``val``."""
    start = time.perf_counter()
    before, test_before = evaluate(net, task.val), evaluate(net, task.test)
    after = None
    kept = "ridge"
    if tune_mode != "none":
        untuned = copy.deepcopy(net.state_dict())
        tune_fn(net, task.fit)
        after = evaluate(net, task.val)
        if after >= before:
            kept = "tuned"
        else:
            net.load_state_dict(untuned)
    val = before if kept == "ridge" else after
    test = test_before if kept == "ridge" else evaluate(net, task.test)
    return TuneResult(before, test_before, after, kept, val, test, time.perf_counter() - start)


def from_scratch(net: AssembledNet, features, task: TargetTask, seed: int) -> tuple[AssembledNet, int]:
    """A copy of ``net`` whose modules are all re-initialised (``reset_parameters``, seeded) with a new ridge head
    fitted on ``fit``; also returns how many parameter tensors no module re-initialises (they keep the zoo values,
    e.g. a timm LayerScale γ), so a report can say so."""
    twin = copy.deepcopy(net)
    reset: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in twin.body.modules():
            if hasattr(module, "reset_parameters") and module is not twin.body:
                module.reset_parameters()
                reset.update(id(p) for p in module.parameters(recurse=False))
    kept = sum(1 for p in twin.body.parameters() if id(p) not in reset)
    twin.head = fit_head(twin.body, features, task.fit.x, task.fit.y, task.num_classes)
    return twin.eval(), kept


def kendall_tau(scores: Sequence[float], accuracies: Sequence[float]) -> float | None:
    """Kendall τ-b of ``scores`` against ``accuracies``; None when undefined."""
    from scipy.stats import kendalltau

    if len(scores) < 2:
        return None
    tau = kendalltau(scores, accuracies).statistic
    return None if tau is None or not math.isfinite(tau) else float(tau)
