"""The baselines S&P is measured against (paper 000, Table 2), under the same data-limited setting:

* **Finetune**: one source model, its classifier replaced by a new one for the target classes, fine-tuned
  whole (BatchNorm statistics frozen) on the target samples.
* **Ensemble**: every involved source model's features (frozen) concatenated, standardised, and a
  trained linear classifier on top (the paper's text-task ensemble; also its Fig. 4 reference).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from zoocompiler.passes.rewrite.repairs import truncate_at
from zoocompiler.training import full_batch_steps

from .packing import fragment_features


class _WithHead(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def features_model(gm: fx.GraphModule, features: str) -> fx.GraphModule:
    """A copy of the classifier ``gm`` returning node ``features`` (its classifier dropped)."""
    new = copy.deepcopy(gm)
    truncate_at(new, features)
    return new.eval()


def finetune(body: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, steps: int = 100,
             lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """``body`` (a features model, copied) with a new linear head, fine-tuned whole on ``(x, y)``
    (full batch, Adam; BatchNorm statistics frozen). Returns the model in eval mode."""
    body = copy.deepcopy(body).eval()
    with torch.no_grad():
        width = body(x[:2]).flatten(1).shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _WithHead(body, nn.Linear(width, num_classes))
    model.eval()
    full_batch_steps(list(model.parameters()), lambda: F.cross_entropy(model(x), y), steps, lr)
    return model


class Ensemble(nn.Module):
    """Concatenated features of several (frozen) models, standardised, then a linear classifier."""

    def __init__(self, bodies: Sequence[nn.Module], head: nn.Linear, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.bodies = nn.ModuleList(bodies)
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([b(x).flatten(1) for b in self.bodies], 1)
        return self.head((joined - self.mean) / self.std)


def ensemble(bodies: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, num_classes: int, *, steps: int = 300,
             lr: float = 1e-2, weight_decay: float = 1e-3, seed: int = 0) -> Ensemble:
    """An :class:`Ensemble` whose classifier is trained on ``(x, y)`` (full batch, Adam)."""
    joined = torch.cat(fragment_features(bodies, x), 1)
    mean, std = joined.mean(0), joined.std(0, unbiased=False).clamp_min(1e-6)
    normed = (joined - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(joined.shape[1], num_classes)
    full_batch_steps(list(head.parameters()), lambda: F.cross_entropy(head(normed), y), steps, lr,
                     weight_decay=weight_decay)
    return Ensemble(bodies, head, mean, std).eval()
