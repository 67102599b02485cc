"""Distilling the ancestry into an auxiliary model (Learngene Pool, Eq. 3-8 and dense distillation).

``L = α·L_cls + (1 − α)(L_att + L_blk + L_pred)``: hard-label cross-entropy, soft cross-entropy to the
ancestry's logits at temperature τ (Eq. 3), and at each distilled level the MSE between the ancestry's
block output (attention output) mapped by a learnable ``W`` (``M``) and the auxiliary's (Eq. 4-5).
The maps are ``Linear(d → d', bias=False)``; with ``d == d'`` they are the identity and have no
parameters. Per level terms are summed (TinyBERT's convention). The ancestry is frozen and runs
without gradients; the auxiliary model and the maps are optimised together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoocompiler.data import DataSplit
from zoocompiler.training import EpochStats, History, train


def dense_levels(ancestry_depth: int, aux_depth: int, levels: int) -> list[tuple[int, int]]:
    """The (ancestry block, auxiliary block) pairs distilled, 1-based: the last block of each of ``levels``
    equal parts of both models (12 → 6 blocks, 3 levels: (4, 2), (8, 4), (12, 6))."""
    if not 1 <= levels <= aux_depth:
        raise ValueError(f"levels must be in 1..{aux_depth} (the auxiliary model's blocks), got {levels}")
    return [(k * ancestry_depth // levels, k * aux_depth // levels) for k in range(1, levels + 1)]


class Taps:
    """Forward hooks on ``blocks`` (1-based numbers) of a timm ViT: each block's output and its
    attention layer's output (after the projection, before the residual add) on the last forward."""

    def __init__(self, model: nn.Module, blocks: list[int]):
        self.blocks: dict[int, torch.Tensor] = {}
        self.attn: dict[int, torch.Tensor] = {}
        self._handles = []
        for b in blocks:
            block = model.blocks[b - 1]
            self._handles.append(block.register_forward_hook(self._keep(self.blocks, b)))
            self._handles.append(block.attn.register_forward_hook(self._keep(self.attn, b)))

    @staticmethod
    def _keep(store: dict[int, torch.Tensor], b: int):
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            store[b] = output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Transforms(nn.Module):
    """The learnable ``W`` (block) and ``M`` (attention) maps of each distilled level, d → d'.

    ``stitch_matrix()`` is the paper's stitch initialisation: the mean of the block maps' weights, a
    ``(d', d)`` matrix (Eq. 4's ``W ∈ R^{d×d'}`` is the transposed weight, so this is ``mean(W)ᵀ``) that a
    stitch from width d' to width d applies as ``Y = X · matrix``; the identity when d == d'.
    """

    def __init__(self, wide: int, narrow: int, levels: int):
        super().__init__()
        self.wide, self.narrow = wide, narrow
        identity = wide == narrow
        self.block = nn.ModuleList([] if identity else [nn.Linear(wide, narrow, bias=False) for _ in range(levels)])
        self.attn = nn.ModuleList([] if identity else [nn.Linear(wide, narrow, bias=False) for _ in range(levels)])

    @property
    def identity(self) -> bool:
        return len(self.block) == 0

    def map_block(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else self.block[level](x)

    def map_attn(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else self.attn[level](x)

    @torch.no_grad()
    def stitch_matrix(self) -> torch.Tensor:
        if self.identity:
            return torch.eye(self.wide)
        return torch.stack([w.weight for w in self.block]).mean(0).detach().clone()


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 3: cross-entropy of the student's softened distribution against the teacher's, batch mean."""
    target = F.softmax(teacher_logits / tau, dim=-1)
    return -(target * F.log_softmax(student_logits / tau, dim=-1)).sum(-1).mean()


@dataclass
class LossParts:
    """The terms of Eq. 8 on one batch (floats, for reports)."""

    total: float
    cls: float
    pred: float
    blk: float
    att: float


class Distiller(nn.Module):
    """The trainable side of distillation: the auxiliary model and its :class:`Transforms`.

    The ancestry is held outside the module tree (frozen, eval mode, not in ``parameters()``).
    """

    def __init__(self, ancestry: nn.Module, aux: nn.Module, levels: list[tuple[int, int]], alpha: float, tau: float):
        super().__init__()
        self.aux = aux
        self.transforms = Transforms(int(ancestry.embed_dim), int(aux.embed_dim), len(levels))
        self.levels = levels
        self.alpha, self.tau = alpha, tau
        self._ancestry = [ancestry.eval().requires_grad_(False)]
        self._anc_taps = Taps(ancestry, [a for a, _ in levels])
        self._aux_taps = Taps(aux, [b for _, b in levels])

    @property
    def ancestry(self) -> nn.Module:
        return self._ancestry[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(x)

    def loss_parts(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, LossParts]:
        """Eq. 8 on a batch: the differentiable total and its terms."""
        with torch.no_grad():
            teacher = self.ancestry(x)
        student = self.aux(x)
        cls = F.cross_entropy(student, y)
        pred = soft_cross_entropy(teacher, student, self.tau)
        blk = sum(F.mse_loss(self.transforms.map_block(k, self._anc_taps.blocks[a]), self._aux_taps.blocks[b])
                  for k, (a, b) in enumerate(self.levels))
        att = sum(F.mse_loss(self.transforms.map_attn(k, self._anc_taps.attn[a]), self._aux_taps.attn[b])
                  for k, (a, b) in enumerate(self.levels))
        total = self.alpha * cls + (1 - self.alpha) * (att + blk + pred)
        parts = LossParts(*(float(t.detach()) for t in (total, cls, pred, blk, att)))
        return total, parts

    def close(self) -> None:
        self._anc_taps.remove()
        self._aux_taps.remove()


@dataclass
class DistillResult:
    """What distilling one auxiliary model produced."""

    transforms: Transforms
    history: History
    levels: list[tuple[int, int]]
    epochs: list[dict] = field(default_factory=list)


def distill(
    ancestry: nn.Module,
    aux: nn.Module,
    split: DataSplit,
    *,
    levels: list[tuple[int, int]],
    alpha: float,
    tau: float,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = False,
    desc: str = "distill",
    max_steps: int | None = None,
) -> DistillResult:
    """Train ``aux`` (in place) on ``split`` with Eq. 8 against the frozen ``ancestry``; the learned maps.

    ±2 px random shifts augment the data (the ancestry sees the same shifted images); a non-finite loss
    stops the run with ``TrainingError``. The ancestry is left frozen (``requires_grad=False``) in eval mode.
    """
    distiller = Distiller(ancestry, aux, levels, alpha, tau)
    records: list[dict] = []

    def on_epoch(stats: EpochStats) -> None:
        records.append({"epoch": stats.epoch, "loss": stats.loss, "seconds": stats.seconds})

    try:
        history = train(distiller, split, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, augment=True,
                        loss_fn=lambda model, x, y: model.loss_parts(x, y)[0], progress=progress, desc=desc,
                        max_steps=max_steps, on_epoch=on_epoch)
    finally:
        distiller.close()
    return DistillResult(distiller.transforms.eval(), history, levels, records)
