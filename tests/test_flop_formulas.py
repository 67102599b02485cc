"""The flop formulas zoocompiler adds to ``torch.utils.flop_counter``: CPU attention and recurrent layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoocompiler.core.modules import count_macs
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.costs import total_cost


class _Sdpa(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q * 2, q * 3)


def test_cpu_sdpa_counts_both_matmuls():
    q = torch.randn(2, 3, 5, 8)  # B, heads, L, d
    assert count_macs(_Sdpa(), q) == 2 * 3 * (5 * 5 * 8) * 2


@pytest.mark.parametrize(
    "cell, gates, kwargs, x",
    [
        (nn.LSTM, 4, {"batch_first": True}, torch.randn(2, 7, 6)),
        (nn.LSTM, 4, {"num_layers": 2, "bidirectional": True}, torch.randn(7, 2, 6)),
        (nn.GRU, 3, {"num_layers": 2}, torch.randn(7, 2, 6)),
        (nn.RNN, 1, {"nonlinearity": "relu", "batch_first": True}, torch.randn(2, 7, 6)),
        (nn.RNN, 1, {}, torch.randn(7, 6)),  # unbatched
    ],
)
def test_recurrent_macs_are_every_weight_matrix_per_step(cell, gates, kwargs, x):
    hidden, layers = 5, kwargs.get("num_layers", 1)
    dirs = 2 if kwargs.get("bidirectional") else 1
    rnn = cell(6, hidden, **kwargs).eval()
    rows = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    per_step = sum(gates * hidden * ((6 if layer == 0 else hidden * dirs) + hidden) for layer in range(layers)) * dirs
    assert count_macs(rnn, x) == rows * per_step

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x)[0]

    assert total_cost(trace(Head().eval(), x)).flops // 2 == rows * per_step
