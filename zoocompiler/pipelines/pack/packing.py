"""Packing fragments (paper 000, "Packing Fragments"): ``F(x) = Enc(concat{F^c(x)})``, a head ``H^K`` on it
and per-fragment decoders ``Dec_c`` trained with ``L^K = CE(H^K(F(x)), y) + δ · Σ_c ‖Dec_c(F(x)) − F^c(x)‖²``.

Fragments are frozen: their features on the training samples are computed once and only ``Enc``,
``Dec_c`` and ``H^K`` are trained (full batch, Adam). Each fragment's features are standardised with
their training mean and deviation (the reconstruction term is then scale-free across architectures);
the standardisation is folded into ``Enc`` afterwards, exactly, so the packed model is
``H^K(ReLU(Enc(concat{F^c(x)})))``. Decoders only train the encoder; the packed model leaves them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoocompiler.training import full_batch_steps


@dataclass(frozen=True)
class PackSettings:
    """Packing hyper-parameters: ``delta`` (δ), encoder ``width`` (0: 32 per class, at most the
    concatenated features), ``steps`` of full-batch Adam at ``lr`` with ``weight_decay``."""

    delta: float = 1.0
    width: int = 0
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    seed: int = 0


class PackedModel(nn.Module):
    """``H^K(ReLU(Enc(concat{flatten(F^c(x))})))``: the fragments of the packed classes (frozen) and the
    trained encoder and head; ``forward(x) -> [B, classes]`` logits in the order of ``classes``."""

    def __init__(self, fragments: Sequence[nn.Module], encoder: nn.Linear, head: nn.Linear, classes: Sequence[int]):
        super().__init__()
        self.fragments = nn.ModuleList(fragments)
        self.encoder = encoder
        self.head = head
        self.classes = list(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.cat([f(x).flatten(1) for f in self.fragments], 1)
        return self.head(F.relu(self.encoder(features)))


@dataclass
class PackTraining:
    """The trained encoder and head (standardisation folded in) and the loss per step."""

    encoder: nn.Linear
    head: nn.Linear
    losses: list[float] = field(default_factory=list)


def encoder_width(settings: PackSettings, classes: int, features: int) -> int:
    return min(features, settings.width or 32 * classes)


@torch.no_grad()
def _fold_standardisation(encoder: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """``encoder((f − mean) / std)`` as one linear layer on ``f``."""
    folded = nn.Linear(encoder.in_features, encoder.out_features)
    folded.weight.copy_(encoder.weight / std[None, :])
    folded.bias.copy_(encoder.bias - (encoder.weight * (mean / std)[None, :]).sum(1))
    return folded


def train_pack(features: Sequence[torch.Tensor], y: torch.Tensor, num_classes: int,
               settings: PackSettings) -> PackTraining:
    """Train ``Enc``, the decoders and ``H^K`` on the fragments' fixed ``features`` (one ``[N, d_c]`` per
    fragment, same rows) with labels ``y`` in ``0..num_classes-1``."""
    flat = [f.flatten(1).float() for f in features]
    joined = torch.cat(flat, 1)
    mean, std = joined.mean(0), joined.std(0, unbiased=False).clamp_min(1e-6)
    normed = (joined - mean) / std
    parts = torch.split(normed, [f.shape[1] for f in flat], 1)
    width = encoder_width(settings, num_classes, joined.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        encoder = nn.Linear(joined.shape[1], width)
        decoders = nn.ModuleList(nn.Linear(width, p.shape[1]) for p in parts)
        head = nn.Linear(width, num_classes)
    params = [*encoder.parameters(), *decoders.parameters(), *head.parameters()]

    def loss_fn() -> torch.Tensor:
        code = F.relu(encoder(normed))
        loss = F.cross_entropy(head(code), y)
        if settings.delta:
            loss = loss + settings.delta * sum(F.mse_loss(dec(code), p) for dec, p in zip(decoders, parts, strict=True))
        return loss

    losses = full_batch_steps(params, loss_fn, settings.steps, settings.lr, weight_decay=settings.weight_decay,
                              data=joined)
    return PackTraining(_fold_standardisation(encoder, mean, std), head, losses)


@torch.no_grad()
def fragment_features(fragments: Sequence[nn.Module], x: torch.Tensor, batch: int = 500) -> list[torch.Tensor]:
    """Every fragment's features on ``x`` (eval mode, in batches)."""
    out = []
    for f in fragments:
        f.eval()
        out.append(torch.cat([f(x[i:i + batch]).flatten(1) for i in range(0, len(x), batch)]))
    return out
