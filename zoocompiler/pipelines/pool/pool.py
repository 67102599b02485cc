"""The learngene pool: two rows of instances, stitch layers between them, and the descendants they make.

Row ``small`` holds the blocks of the narrow auxiliary model (width d'), row ``large`` those of the
full-width one (width d), both ``l`` blocks deep. Descendant ``low`` takes the first ``low`` instances
of the small row and the last ``high = l − low`` of the large row (small → large, as SN-Net stitches):
the small model's embedding and blocks 1..low, a stitch layer (width d' → d, one per stitching
position), then the large model's blocks low+1..l and its head. ``low = l`` is the small auxiliary
model and ``low = 0`` the large one, exactly (no stitch is inserted).

Both rows are traced once (``zoocompiler.trace``); a path is cut from the traces with
``passes.rewrite.blocks.extract_block`` at the block boundaries the cut-point analysis finds
(``stack_boundaries``), so every path shares the rows' parameters and one fine-tuning step on a path
trains the pool. Stitches are ``passes.rewrite.stitch`` layers (tokens → tokens: one linear map per
token); their initialisation is the paper's ``tm`` (the mean of the distillation's block maps),
SN-Net's ``ls`` (least squares on probe activations, ridge as in DeRy's composition) or ``random``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoocompiler.core.errors import ZooError
from zoocompiler.core.modules import count_macs, count_params
from zoocompiler.data import DataSplit
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.activations import cut_point_activations
from zoocompiler.passes.analysis.cut_points import CutPoint, cut_point_table, stack_boundaries
from zoocompiler.passes.rewrite.blocks import extract_block
from zoocompiler.passes.rewrite.compose import stitch_ridge
from zoocompiler.passes.rewrite.stitch import Stitch, make_stitch
from zoocompiler.training import History, evaluate, train

from .distill import soft_cross_entropy

STACK = "blocks"


@dataclass(frozen=True)
class DescendantPath:
    """Descendant ``low``: ``head`` (small row up to block ``low``), ``stitch`` and ``tail`` (large row on);
    ``head`` or ``tail`` is ``None`` at the ends (the whole large / small model is the other part)."""

    low: int
    head: nn.Module | None
    tail: nn.Module | None


class LearngenePool(nn.Module):
    """The pool: ``small`` and ``large`` (timm ViTs, the instance rows) and ``stitches[str(low)]`` for
    ``low`` in 1..l−1. ``forward(x, low)`` runs descendant ``low``. ``example`` is one input batch
    (the rows are traced at its shape)."""

    def __init__(self, small: nn.Module, large: nn.Module, example: torch.Tensor):
        super().__init__()
        depth = len(small.blocks)
        if len(large.blocks) != depth:
            raise ZooError(f"the pool's rows differ in depth ({depth} vs {len(large.blocks)})",
                           "distil both auxiliary models with the same --blocks")
        self.small, self.large = small, large
        self.depth = depth
        self.stitches = nn.ModuleDict()
        self._graphs = {"small": trace(small.eval(), example), "large": trace(large.eval(), example)}
        self._bounds = {row: stack_boundaries(gm, STACK, depth) for row, gm in self._graphs.items()}
        self._cuts = {row: cut_point_table(gm) for row, gm in self._graphs.items()}
        self._paths: dict[int, DescendantPath] = {}
        for low in range(1, depth):
            self.stitches[str(low)] = self._init_stitch(low, "random", None, None)

    # -- structure --------------------------------------------------------------------------------

    def lows(self) -> list[int]:
        """Every descendant, smallest first (``low = l`` down to 0)."""
        return list(range(self.depth, -1, -1))

    def _cut(self, row: str, low: int) -> CutPoint:
        """The cut point of row ``row`` after its block ``low`` (0: before the first block)."""
        return self._cuts[row][self._bounds[row][low]]

    def path(self, low: int) -> DescendantPath:
        if not 0 <= low <= self.depth:
            raise ZooError(f"no descendant with low={low}", f"pick low in 0..{self.depth}")
        if low not in self._paths:
            if low == self.depth:
                self._paths[low] = DescendantPath(low, self._graphs["small"], None)
            elif low == 0:
                self._paths[low] = DescendantPath(low, None, self._graphs["large"])
            else:
                gm = self._graphs["large"]
                last = len(graph_info(gm).cut_points) - 1
                tail = extract_block(gm, self._bounds["large"][low], last).module
                head = extract_block(self._graphs["small"], 0, self._bounds["small"][low]).module
                self._paths[low] = DescendantPath(low, head, tail)
        return self._paths[low]

    def path_module(self, low: int) -> nn.Sequential:
        """Descendant ``low`` as ``Sequential(head, stitch, tail)`` (the parts that exist), sharing the pool's
        weights."""
        p = self.path(low)
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        if p.head is not None:
            parts["head"] = p.head
        if p.head is not None and p.tail is not None:
            parts["stitch"] = self.stitches[str(low)]
        if p.tail is not None:
            parts["tail"] = p.tail
        return nn.Sequential(parts)

    def descendant(self, low: int) -> nn.Module:
        """A standalone copy of descendant ``low`` (eval mode): for export, shares nothing with the pool."""
        return copy.deepcopy(self.path_module(low)).eval()

    def forward(self, x: torch.Tensor, low: int) -> torch.Tensor:
        return self.path_module(low)(x)

    # -- stitch initialisation ----------------------------------------------------------------------

    @torch.no_grad()
    def init_stitches(self, init: str, *, matrix: torch.Tensor | None = None, probe: torch.Tensor | None = None,
                      seed: int = 0) -> None:
        """Re-initialise every stitch: ``tm`` from ``matrix`` (d' × d, ``Y = X·matrix``), ``ls`` by ridge least
        squares from the small row's activations to the large row's on ``probe`` images, ``random``
        (PyTorch's default, seeded; the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if init == "ls":
                if probe is None:
                    raise ZooError("ls init needs probe images", "pass probe images")
                probes = {row: cut_point_activations(gm, probe, [self._cut(row, low).node for low in
                                                                 range(1, self.depth)])
                          for row, gm in self._graphs.items()}  # one forward per row for every position
            for low in range(1, self.depth):
                pair = None if init != "ls" else tuple(probes[row][self._cut(row, low).node]
                                                        for row in ("small", "large"))
                self.stitches[str(low)].load_state_dict(self._init_stitch(low, init, matrix, pair).state_dict())

    @torch.no_grad()
    def _init_stitch(self, low: int, init: str, matrix: torch.Tensor | None,
                     probes: tuple[torch.Tensor, torch.Tensor] | None) -> Stitch:
        """A fresh stitch for position ``low``, initialised by ``init`` (``ls``: from the (small, large) rows'
        activations there on the same probe images)."""
        src, dst = self._cut("small", low).tensor, self._cut("large", low).tensor
        if init == "tm":
            if matrix is None:
                raise ZooError("tm init needs the distillation's transformation matrices",
                               "distil the pool again, or pick --init ls or random")
            return make_stitch(src, dst, init=matrix)
        if init == "ls":
            src_act, dst_act = probes
            return make_stitch(src, dst, probe_src=src_act, probe_dst=dst_act, ridge=stitch_ridge(src_act, src))
        if init == "random":
            return make_stitch(src, dst, init="random")
        raise ZooError(f"unknown stitch init {init!r}", "use tm, ls or random")

    # -- measures ---------------------------------------------------------------------------------------

    def storage(self) -> dict[str, int]:
        """Parameters the pool stores: each row and the stitches."""
        rows = {"small": count_params(self.small), "large": count_params(self.large),
                "stitches": count_params(self.stitches)}
        return {**rows, "total": sum(rows.values())}

    def descendant_rows(self, split: DataSplit | None, input_shape: tuple[int, ...]) -> list[dict]:
        """One row per descendant, smallest first: low, high, params, MACs and (with ``split``) test accuracy."""
        rows = []
        for low in self.lows():
            module = self.path_module(low).eval()
            row = {"low": low, "high": self.depth - low, "params": count_params(module),
                   "macs": count_macs(module, input_shape, eval=True)}
            if split is not None:
                row["accuracy"] = evaluate(module, split)
            rows.append(row)
        return rows


def finetune(
    pool: LearngenePool,
    split: DataSplit,
    *,
    ancestry: nn.Module | None,
    epochs: int,
    lr: float,
    batch_size: int,
    tau: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    desc: str = "finetune",
    max_steps: int | None = None,
) -> tuple[History, list[int]]:
    """Algorithm 1, lines 11-14: each step trains one uniformly sampled path on CE (Eq. 7) plus, with an
    ``ancestry``, the soft CE to its logits (Eq. 3). Returns the history and how often each ``low`` was
    sampled. Parameters off the sampled path get no gradient and are not updated that step. The ancestry is
    left frozen (``requires_grad=False``) in eval mode."""
    generator = torch.Generator().manual_seed(seed + 7919)
    counts = [0] * (pool.depth + 1)
    if ancestry is not None:
        ancestry.eval().requires_grad_(False)

    def loss_fn(model: LearngenePool, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        low = int(torch.randint(0, model.depth + 1, (1,), generator=generator))
        counts[low] += 1
        logits = model(x, low)
        loss = F.cross_entropy(logits, y)
        if ancestry is not None:
            with torch.no_grad():
                teacher = ancestry(x)
            loss = loss + soft_cross_entropy(teacher, logits, tau)
        return loss

    history = train(pool, split, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, augment=True,
                    loss_fn=loss_fn, progress=progress, desc=desc, max_steps=max_steps)
    return history, counts


def example_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """A fixed two-sample batch of ``shape`` (C, H, W) to trace the rows at."""
    return torch.zeros(2, *shape)
