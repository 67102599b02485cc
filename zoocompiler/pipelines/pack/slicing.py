"""Slicing one source model into per-class fragments (paper 000, "Slicing the Network", Fig. 3).

For class ``c`` of a source model ``M`` with its few samples ``D`` (``D_c`` those of class ``c``):

1. **Per layer i** (every layer starts from ``M``):
   * *ability pooling*: fine-tune layer ``i`` with ``L^P = ‖M'(x) − M(x)‖² / ‖M(x)‖² + α · ‖Z_i^c‖₂,₁ / ‖Z_i^c(M)‖₂,₁``
     (features; the ℓ₂,₁ of the layer's outputs on ``D_c``, relative to the original's);
   * *unit selection* (:func:`select_units`) by ``threshold`` (``s_j / max s > 1 − β``) or ``rate``
     (the top ``⌈β·u_i⌉``), ``s_j`` the mean ℓ₂ norm of unit ``j``'s output on ``D_c``;
   * *ability adaption*: the repair ``l_i`` is initialised by least squares (dropped units from kept ones
     on ``D``), then layer ``i``, ``l_i`` and the one-vs-rest head ``H`` are trained with
     ``L^A = CE(H(M(x; f~_i)), [y = c]) + γ · ‖M(x; f̄_i) − M(x)‖² / ‖M(x)‖²`` (class-balanced CE).
2. **Combining**, front to back: with layers ``1..i`` repaired, layer ``i``, ``l_i`` and ``H`` are trained
   with ``L^C_i`` (the same loss over ``1..i``).
3. The fragment is cut (``passes.rewrite.repairs.cut_fragment``): prune + every ``l_i`` fused into its
   next layer.

Norms of features are relative (divided by the original's mean square) so one ``γ`` and one ``α`` fit
every architecture. BatchNorm statistics stay frozen (eval mode): a few samples per class cannot
re-estimate them.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from zoocompiler.core.errors import ZooError
from zoocompiler.passes.rewrite.repairs import Fragment, SliceLayers, SliceNet, cut_fragment, slice_net
from zoocompiler.training import full_batch_steps

SELECTIONS = ("threshold", "rate")
Tick = Callable[[str], None]


@dataclass(frozen=True)
class SliceSettings:
    """The slicing hyper-parameters (see the module docstring); ``steps`` per stage, full-batch Adam."""

    select: str = "threshold"
    beta: float = 0.5
    alpha: float = 0.2
    gamma: float = 1.0
    pool_steps: int = 20
    adapt_steps: int = 20
    combine_steps: int = 20
    lr: float = 1e-3
    head_steps: int = 200
    seed: int = 0


@dataclass
class ClassSlice:
    """One class's fragment and what slicing measured on the way."""

    fragment: Fragment
    kept: list[list[int]]
    units: list[int]
    repair_residual: list[float | None]
    seconds: float
    losses: dict[str, list[float]] = field(default_factory=dict)


def l21(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``‖Z‖₂,₁``: per sample, the sum over units (along ``dim``) of each unit's ℓ₂ norm; mean over samples."""
    return unit_norms(z, dim).sum(1).mean()


def unit_norms(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``[B, units]``: the ℓ₂ norm of every unit's output (all positions but the batch) per sample."""
    moved = torch.movedim(z, dim % z.dim(), 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1).norm(dim=2)


def select_units(scores: torch.Tensor, select: str, beta: float) -> list[int]:
    """The selected units of one layer: ``rate`` keeps the ``⌈β·u⌉`` highest ``scores`` (ties: lower
    index first); ``threshold`` keeps ``j`` with ``scores[j] / max(scores) > 1 − β`` (the best unit always;
    unit 0 when every score is 0)."""
    if select not in SELECTIONS:
        raise ZooError(f"unknown selection '{select}'", f"use one of: {', '.join(SELECTIONS)}")
    if not (0 < beta <= 1):
        raise ZooError(f"beta {beta} is outside (0, 1]", "pass --beta in (0, 1], e.g. 0.5")
    s = scores.detach().double()
    u = len(s)
    if select == "rate":
        count = min(u, max(1, math.ceil(beta * u - 1e-9)))
        order = sorted(range(u), key=lambda j: (-float(s[j]), j))
        return sorted(order[:count])
    top = float(s.max())
    if top <= 0:
        return [0]
    return [j for j in range(u) if float(s[j]) / top > 1 - beta]


def _balanced_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(target, minlength=2).clamp_min(1).float()
    return F.cross_entropy(logits, target, weight=counts.sum() / (2 * counts))


def fit_head(features: torch.Tensor, target: torch.Tensor, steps: int, seed: int) -> nn.Linear:
    """A one-vs-rest linear head ``[features] → 2`` fitted on fixed features (class-balanced CE, Adam)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(features.shape[1], 2)
    full_batch_steps(list(head.parameters()), lambda: _balanced_ce(head(features), target), steps, 1e-2)
    return head


def _only_trainable(net: nn.Module, params: list[nn.Parameter]) -> None:
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


class _Losses:
    """The S&P losses on one source's samples ``x`` (``pos``: the class's rows, ``target``: one-vs-rest)."""

    def __init__(self, x: torch.Tensor, target: torch.Tensor, reference: torch.Tensor, gamma: float):
        self.x, self.target, self.reference, self.gamma = x, target, reference, gamma
        self.scale = reference.pow(2).mean().clamp_min(1e-12)
        self.pos = target.bool()

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.reference).pow(2).mean() / self.scale

    def adaption(self, net: SliceNet, head: nn.Module, repaired: range | list[int]) -> torch.Tensor:
        """``L_cls`` with ``repaired`` layers on, plus ``γ·L_dis`` with them replaced by their dropped units."""
        net.set_on(repaired)
        cls = _balanced_ce(head(net(self.x)), self.target)
        net.set_on([])
        return cls + self.gamma * self.distance(net(self.x))


def _layer_state(net: SliceNet, i: int) -> dict[str, torch.Tensor]:
    """Layer ``i``'s chain parameters and its gate / repair state (what stage 1 hands to combining)."""
    names = {id(p) for p in net.layer_parameters(i)}
    state = {k: v.detach().clone() for k, v in net.gm.named_parameters() if id(v) in names}
    mod = net.gate(i) or net.repair(i)
    prefix = next(k for k, m in net.gm.named_modules() if m is mod)
    state.update({f"{prefix}.{k}": v.detach().clone() for k, v in mod.state_dict().items()})
    return state


@torch.no_grad()
def _fit_repair(net: SliceNet, i: int, x: torch.Tensor) -> float | None:
    """Initialise layer ``i``'s repair by least squares on the values its sites read; its residual."""
    repair = net.repair(i)
    if repair is None:
        return None
    seen: list[torch.Tensor] = []
    hook = repair.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        net.set_on([])
        net(x)
    finally:
        hook.remove()
    return repair.fit(torch.cat([repair.rows(v) for v in seen]))


def slice_class(
    gm: fx.GraphModule,
    layers: SliceLayers,
    x: torch.Tensor,
    y: torch.Tensor,
    label: int,
    settings: SliceSettings,
    tick: Tick | None = None,
) -> ClassSlice:
    """The fragment of source label ``label`` (an index into the source model's classes) cut from the
    analysed classifier ``gm`` with its samples ``(x, y)``. ``tick(stage)`` is called after every layer
    of every stage (progress)."""
    start = time.perf_counter()
    base = slice_net(gm, layers).eval()
    with torch.no_grad():
        reference = base(x)
    target = (y == label).long()
    losses = _Losses(x, target, reference, settings.gamma)
    head = fit_head(reference.flatten(1), target, settings.head_steps, settings.seed)
    flat_head = nn.Sequential(nn.Flatten(1), head)
    logs: dict[str, list[float]] = {"pooling": [], "adaption": [], "combining": []}
    states, kept, residuals = [], [], []
    n = len(layers.layers)
    for i in range(n):
        net = copy.deepcopy(base)
        params = net.layer_parameters(i)
        capture = net.capture(i)
        dim = layers.layers[i].point.dim
        capture.on = True
        with torch.no_grad():
            net(x)
            z0 = l21(capture.value[losses.pos], dim).clamp_min(1e-12)
        _only_trainable(net, params)

        def pooling(net=net, capture=capture, dim=dim, z0=z0) -> torch.Tensor:
            features = net(x)
            return losses.distance(features) + settings.alpha * l21(capture.value[losses.pos], dim) / z0

        logs["pooling"] += full_batch_steps(params, pooling, settings.pool_steps, settings.lr)
        with torch.no_grad():
            net(x)
            scores = unit_norms(capture.value[losses.pos], dim).mean(0)
        capture.on = False
        capture.value = None
        chosen = select_units(scores, settings.select, settings.beta)
        net.set_keep(i, chosen)
        residuals.append(_fit_repair(net, i, x))
        layer_head = copy.deepcopy(flat_head)
        repair = net.repair(i)
        trained = params + ([] if repair is None else list(repair.parameters())) + list(layer_head.parameters())
        _only_trainable(net, trained)
        logs["adaption"] += full_batch_steps(
            trained, lambda net=net, layer_head=layer_head, i=i: losses.adaption(net, layer_head, [i]),
            settings.adapt_steps, settings.lr)
        states.append(_layer_state(net, i))
        kept.append(chosen)
        if tick is not None:
            tick("adapt")
    net = copy.deepcopy(base)
    for state in states:
        net.gm.load_state_dict(state, strict=False)
    combined_head = copy.deepcopy(flat_head)
    for i in range(n):
        repair = net.repair(i)
        trained = net.layer_parameters(i) + ([] if repair is None else list(repair.parameters()))
        trained += list(combined_head.parameters())
        _only_trainable(net, trained)
        logs["combining"] += full_batch_steps(
            trained, lambda i=i: losses.adaption(net, combined_head, range(i + 1)), settings.combine_steps, settings.lr)
        if tick is not None:
            tick("combine")
    net.set_on(range(n))
    fragment = cut_fragment(gm, net.eval())
    return ClassSlice(fragment, kept, [layer.units for layer in layers.layers], residuals,
                      time.perf_counter() - start, logs)
