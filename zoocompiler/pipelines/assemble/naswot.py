"""NASWOT of a model: its pre-activation signs (an analysis pass) scored by the NASWOT solver."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from zoocompiler.passes.analysis.preactivations import record_preactivations
from zoocompiler.solvers.naswot import NaswotKernel, mean_score


def naswot(model: nn.Module, batches: Iterable[torch.Tensor], *, layers: str = "relu") -> float:
    """Mean NASWOT score over ``batches`` (the paper: 5 batches of 32).

    layers="relu": codes from every activation module (``ACTIVATION_MODULES`` and timm's) via forward
    pre-hooks, plus the functional activations (``F.relu``, ``torch.relu``, ``x.relu()``, the aten ops of
    ``torch.export``, ...) of an ``fx.GraphModule``; all use the sign of the activation's input.
    layers="outputs": the model output only.
    Runs in eval mode without gradients and restores every module's training flag; -inf if any batch is.
    """
    scores = []
    for batch in batches:
        kernel = NaswotKernel(batch.shape[0])
        record_preactivations(model, batch, layers, lambda x, kernel=kernel: kernel.add(x > 0))
        scores.append(kernel.score())
    return mean_score(scores)
