"""MwT's cohesion and coupling losses (paper 004, Eqs. 4–5) on a batch of sample masks ``[B, K]``.

Both use the cosine similarity between sample masks, computed per layer (the mask of one gate point) and
averaged over the layers (``layers``: ``[start, stop)`` ranges of the concatenated mask; None: the whole
vector as one). Per layer, because a BatchNorm after a masked layer undoes the mask's scale: on the
concatenated vector the layers whose masks shrank would stop counting. Classes absent from the batch are
left out (Eq. 4's N counts the classes with ≥ 2 samples in the batch, Eq. 5's the classes present); a
batch without such classes contributes 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _class_similarity(masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sums ``P[h, i]`` of cosine similarities over sample pairs of classes h, i incl. j = k; the
    self-similarity sum per class; samples per class), over the classes present."""
    classes, index = torch.unique(labels, return_inverse=True)
    onehot = F.one_hot(index, len(classes)).to(masks.dtype)
    unit = F.normalize(masks, dim=1)
    sim = unit @ unit.T
    pair_sums = onehot.T @ sim @ onehot
    self_sums = onehot.T @ sim.diagonal()
    return pair_sums, self_sums, onehot.sum(0)


def _per_layer(loss, masks: torch.Tensor, labels: torch.Tensor, layers: Sequence[tuple[int, int]] | None):
    if layers is None:
        return loss(masks, labels)
    return torch.stack([loss(masks[:, a:b], labels) for a, b in layers]).mean()


def cohesion_loss(masks: torch.Tensor, labels: torch.Tensor,
                  layers: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Eq. 4: 1 − the mean over classes of the mean cosine similarity of their sample pairs (per layer)."""
    return _per_layer(_cohesion, masks, labels, layers)


def coupling_loss(masks: torch.Tensor, labels: torch.Tensor,
                  layers: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Eq. 5: the mean over class pairs h < i of the mean cosine similarity between their samples (per layer)."""
    return _per_layer(_coupling, masks, labels, layers)


def _cohesion(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pair_sums, self_sums, n = _class_similarity(masks, labels)
    ok = n >= 2
    if not bool(ok.any()):
        return masks.sum() * 0
    within = (pair_sums.diagonal() - self_sums)[ok] / (n[ok] * (n[ok] - 1))
    return 1 - within.mean()


def _coupling(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pair_sums, _, n = _class_similarity(masks, labels)
    k = len(n)
    if k < 2:
        return masks.sum() * 0
    cross = pair_sums / (n[:, None] * n[None, :])
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=masks.device), diagonal=1)
    return cross[upper].mean()
