"""Small facts about torch modules: eval mode for a while, parameter and MAC counts, non-finite weights."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (every submodule) in eval mode; restore each submodule's own flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, each shared tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def count_macs(module: nn.Module, x: torch.Tensor | Sequence[int], *, eval: bool = False) -> int:
    """Multiply-accumulates of one forward pass (``torch.utils.flop_counter`` FLOPs / 2).

    ``x`` is an input tensor, or a per-sample shape (then one zero sample is used). ``eval=True``
    runs the module in eval mode (each submodule's mode is restored afterwards).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(x, torch.Tensor):
        x = torch.zeros(1, *x)
    with contextlib.ExitStack() as stack:
        if eval:
            stack.enter_context(eval_mode(module))
        stack.enter_context(torch.no_grad())
        counter = stack.enter_context(FlopCounterMode(display=False))
        module(x)
    return int(counter.get_total_flops()) // 2


def nonfinite_weights(module: nn.Module) -> str | None:
    """Where ``module``'s floating-point parameters and buffers hold NaN or inf, in words
    ("3 of 6,282 values, in 'fc.weight' and 1 other tensor"); ``None`` when every value is finite."""
    bad, total, names = 0, 0, []
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if not (t.is_floating_point() or t.is_complex()):
            continue
        total += t.numel()
        n = int((~torch.isfinite(t.detach())).sum())
        if n:
            bad += n
            names.append(name)
    if not names:
        return None
    others = len(names) - 1
    where = f"'{names[0]}'" + (f" and {others} other tensor{'s' if others > 1 else ''}" if others else "")
    return f"{bad:,} of {total:,} values, in {where}"

