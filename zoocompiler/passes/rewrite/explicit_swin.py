"""Pruned torchvision Swin attention: ``shifted_window_attention`` with the head width given explicitly.

torchvision's ``shifted_window_attention`` takes ``head_dim = C // num_heads`` and its output width from
the input width ``C``, so it cannot run a pruned head set fed by a pruned residual stream. The prune pass
calls :func:`explicit_shifted_window_attention` instead wherever the function's weights were sliced: the
same computation (padding to whole windows, cyclic shift and its attention mask, relative position bias,
Swin V2's cosine attention with a clamped logit scale and its zero key bias), with the head count read
from ``qkv_weight``, the original ``head_dim`` (and so the original ``head_dim ** -0.5`` scale) and the
output width from ``proj_weight``. Written by hand: the algorithm of the Swin papers, no library exposes
a width-explicit form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _windows(x: Tensor, ws: tuple[int, int]) -> Tensor:
    """B × H × W × C → (B · windows) × (ws0 · ws1) × C."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws[0], ws[0], W // ws[1], ws[1], C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws[0] * ws[1], C)


def _shift_mask(x: Tensor, size: tuple[int, int], ws: tuple[int, int], shift: list[int]) -> Tensor:
    """windows × N × N additive mask: -100 between tokens that came from different regions of the shifted map."""
    regions = x.new_zeros(size)
    label = 0
    for h in ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None)):
            regions[h[0] : h[1], w[0] : w[1]] = label
            label += 1
    per_window = _windows(regions[None, :, :, None], ws).squeeze(-1)  # windows × N
    diff = per_window.unsqueeze(1) - per_window.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def explicit_shifted_window_attention(
    input: Tensor, qkv_weight: Tensor, proj_weight: Tensor, relative_position_bias: Tensor, window_size: list[int],
    num_heads: int, shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
    qkv_bias: Tensor | None = None, proj_bias: Tensor | None = None, logit_scale: Tensor | None = None,
    training: bool = True, *, head_dim: int,
) -> Tensor:
    """torchvision's ``shifted_window_attention`` (same arguments; ``num_heads`` is ignored) for heads of width
    ``head_dim``: ``qkv_weight.shape[0] // (3 · head_dim)`` heads on an input of any width."""
    B, H, W, _ = input.shape
    ws = (int(window_size[0]), int(window_size[1]))
    x = F.pad(input, (0, 0, 0, (ws[1] - W % ws[1]) % ws[1], 0, (ws[0] - H % ws[0]) % ws[0]))
    _, pad_h, pad_w, _ = x.shape
    shift = [0 if ws[0] >= pad_h else int(shift_size[0]), 0 if ws[1] >= pad_w else int(shift_size[1])]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = _windows(x, ws)
    heads = qkv_weight.shape[0] // (3 * head_dim)
    if logit_scale is not None and qkv_bias is not None:  # Swin V2: no key bias
        qkv_bias = torch.cat([qkv_bias[: heads * head_dim], torch.zeros_like(qkv_bias[: heads * head_dim]),
                              qkv_bias[2 * heads * head_dim :]])
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.size(0), x.size(1), 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(x, (pad_h, pad_w), ws, shift)
        attn = (attn.view(-1, mask.shape[0], heads, x.size(1), x.size(1)) + mask[None, :, None]).flatten(0, 1)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(x.size(0), x.size(1), heads * head_dim)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    c_out = x.shape[-1]
    x = x.view(B, pad_h // ws[0], pad_w // ws[1], ws[0], ws[1], c_out).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(B, pad_h, pad_w, c_out)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()
