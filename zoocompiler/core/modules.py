"""Small facts about torch modules: eval mode for a while, parameter and MAC counts, non-finite weights.

Importing it completes ``torch.utils.flop_counter``'s formulas for CPU attention (:func:`_count_cpu_attention`)."""

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


def _count_cpu_attention() -> None:
    """Give ``torch.utils.flop_counter`` the formula it lacks for the CPU kernel of
    ``F.scaled_dot_product_attention`` (``_scaled_dot_product_flash_attention_for_cpu``): the same as
    its CUDA flash kernel. Without it every attention layer run on CPU counts 0 MACs for q·kᵀ and attn·v."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_registry or op.default in flop_registry:
        return

    @register_flop_formula(op, get_raw=True)
    def _cpu_sdpa_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)


def _count_recurrent_layers() -> None:
    """Formulas for ``nn.LSTM``/``GRU``/``RNN``'s fused ops (``aten.lstm`` etc., padded-tensor form), which
    ``torch.utils.flop_counter`` lacks: every weight matrix (input, recurrent, projection) is applied once per
    time step and sequence, so FLOPs = 2 · steps · batch · Σ matrix sizes."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    for op in (aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu):
        if op in flop_registry:
            continue

        @register_flop_formula(op, get_raw=True)
        def _rnn_flop(*args, out_val=None, **kwargs) -> int:
            x = args[0]
            if isinstance(args[1], torch.Tensor):  # packed: (data, batch_sizes, hx, params, ...)
                rows, params = x.shape[0], args[3]
            else:  # padded: (input, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first)
                rows, params = (x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]), args[2]
            return 2 * rows * sum(w.numel() for w in params if w.dim() == 2)

    mkldnn = aten.mkldnn_rnn_layer  # the oneDNN LSTM kernel CPU builds use instead: one call per layer and direction
    if mkldnn not in flop_registry:

        @register_flop_formula(mkldnn, get_raw=True)
        def _mkldnn_rnn_flop(x, w_ih, w_hh, *args, out_val=None, **kwargs) -> int:
            return 2 * x.shape[0] * x.shape[1] * (w_ih.numel() + w_hh.numel())


_count_cpu_attention()
_count_recurrent_layers()


@contextlib.contextmanager
def countable_attention() -> Iterator[None]:
    """Turn off ``nn.MultiheadAttention``'s inference fast path for a while: its fused kernel
    (``_native_multi_head_attention``) has no ``torch.utils.flop_counter`` formula, so MACs counted
    through it miss the whole attention layer. The slow path computes the same values."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


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
        stack.enter_context(countable_attention())
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

