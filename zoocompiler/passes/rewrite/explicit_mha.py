"""A pruned ``nn.MultiheadAttention``: the same computation with head count, head width and input
width given explicitly.

``nn.MultiheadAttention`` derives ``head_dim`` from ``embed_dim`` and requires the query width to
equal ``embed_dim``, so it cannot hold a pruned set of heads fed by a pruned residual stream. The
prune pass replaces every sliced instance by :class:`ExplicitMultiheadAttention`, built from the
sliced weights: per kept head the original q/k/v rows and ``out_proj`` columns, the original
``head_dim ** -0.5`` scale, and softmax attention through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ExplicitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward (self or cross attention, ``attn_mask``, ``key_padding_mask``,
    ``need_weights``) for ``num_heads`` heads of width ``head_dim`` on inputs of any width."""

    def __init__(self, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None, out_proj: nn.Linear,
                 head_dim: int, batch_first: bool, dropout: float):
        super().__init__()
        self.in_proj_weight = nn.Parameter(in_proj_weight)
        self.in_proj_bias = nn.Parameter(in_proj_bias) if in_proj_bias is not None else None
        self.out_proj = out_proj
        self.head_dim = head_dim
        self.num_heads = in_proj_weight.shape[0] // (3 * head_dim)
        self.batch_first = batch_first
        self.dropout = dropout

    @classmethod
    def from_sliced(cls, m: nn.MultiheadAttention, head_dim: int) -> ExplicitMultiheadAttention:
        """From ``m`` whose ``in_proj_weight`` rows (whole heads) and columns, and ``out_proj``, were sliced."""
        out_proj = nn.Linear(m.out_proj.weight.shape[1], m.out_proj.weight.shape[0], bias=m.out_proj.bias is not None)
        out_proj.weight, out_proj.bias = m.out_proj.weight, m.out_proj.bias
        return cls(m.in_proj_weight.data, None if m.in_proj_bias is None else m.in_proj_bias.data, out_proj, head_dim,
                   m.batch_first, m.dropout)

    def _heads(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, w, b)  # B × L × H·d
        return y.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # B × H × L × d

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = self._heads(query, wq, bq), self._heads(key, wk, bk), self._heads(value, wv, bv)
        mask = _merged_mask(attn_mask, key_padding_mask, q)
        if is_causal and mask is None:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril().logical_not()
            mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask, float("-inf"))
        drop = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, drop, self.training) @ v
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, mask, drop, scale=self.head_dim**-0.5), None
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        return out, weights


def _merged_mask(attn_mask, key_padding_mask, q: torch.Tensor) -> torch.Tensor | None:
    """One additive float mask (broadcastable to B × H × L × S) from MHA's two masks (bool: True = masked)."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(m, dtype=q.dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.unflatten(0, (-1, q.shape[1])) if mask.dim() == 3 else mask  # (B·H) × L × S
    if key_padding_mask is not None:
        kp = additive(key_padding_mask)[:, None, None, :]
        mask = kp if mask is None else mask + kp
    return mask
