"""Streams normalised by RMSNorm or by mean/var/std/sum reductions over the unit dim, under
``layernorm_streams="prune"``: prunable, marked approx, and pruned == the masked reference whose
statistics run over the kept units (:mod:`zoocompiler.passes.rewrite.masked_stats`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.pruning import assert_close, randomized
from hypothesis import given, settings
from hypothesis import strategies as st

from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import run_analysis, trace
from zoocompiler.passes.analysis.plans import plan_by_importance
from zoocompiler.passes.analysis.unit_groups import group_approx
from zoocompiler.passes.rewrite.masked_stats import masked_reduction, masked_rms_norm
from zoocompiler.passes.rewrite.prune import masked_reference, prune


class TokenStream(nn.Module):
    """Tokens B×N×D through residual blocks, each normalised by ``norm`` (a callable on the stream)."""

    def __init__(self, norm: str, dim: int = 12, depth: int = 2):
        super().__init__()
        self.kind = norm
        self.embed = nn.Linear(6, dim)
        self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(depth))
        self.gamma = nn.Parameter(torch.randn(dim) * 0.3 + 1.0)
        self.fc1 = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def normed(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms_module":
            return self.norms[i](x)
        if self.kind == "rms_fn":
            return F.rms_norm(x, (x.shape[-1],), self.gamma, 1e-6)
        if self.kind == "var":  # ConvNeXt-rms style: x / sqrt(var + eps), unbiased
            return x * torch.rsqrt(torch.var(x, dim=(-1,), keepdim=True) + 1e-6) * self.gamma
        if self.kind == "var_biased":
            return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        if self.kind == "std_mean":
            std, mean = torch.std_mean(x, dim=-1, keepdim=True)
            return (x - mean) / (std + 1e-5)
        if self.kind == "grn":  # ConvNeXt V2 global response norm, on tokens: norm over N, mean over units
            gx = torch.norm(x, p=2, dim=1, keepdim=True)
            return x * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) * self.gamma + x
        if self.kind == "ln_then_rms":  # a norm feeding a norm (Swin's stem norm → block norm1)
            return self.norms[i](F.layer_norm(x, (x.shape[-1],)))
        if self.kind == "sum":
            return x / (x.abs().sum(-1, keepdim=True) + 1.0)
        raise ValueError(self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for i in range(len(self.fc1)):
            x = x + self.fc2[i](F.gelu(self.fc1[i](self.normed(i, x))))
        return self.head(x.mean(1))


KINDS = ("rms_module", "rms_fn", "var", "var_biased", "std_mean", "grn", "sum", "ln_then_rms")


def _model(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = TokenStream(kind).eval()
    with torch.no_grad():
        for m in model.norms:
            m.weight.copy_(torch.randn(m.weight.shape) * 0.3 + 1.0)
    return model, torch.randn(2, 7, 6)


def _stream_group(gm: torch.fx.GraphModule):
    return next(g for g in graph_info(gm).unit_groups if any(m.param == "embed.weight" and m.dim == 0
                                                             for m in g.members))


@pytest.mark.parametrize("kind", KINDS)
def test_stream_is_pinned_by_default_in_pin_mode_and_approx_in_prune_mode(kind):
    model, x = _model(kind)
    pinned = _stream_group(run_analysis(trace(model, x, analyze=False), layernorm_streams="pin"))
    relaxed = _stream_group(run_analysis(trace(model, x, analyze=False), layernorm_streams="prune"))
    assert pinned.pinned and "unit dim" in " ".join(pinned.reasons)
    assert not relaxed.pinned and group_approx(relaxed) == "layernorm"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_equals_masked_statistics(kind, seed):
    model, x = _model(kind, seed)
    gm = randomized(run_analysis(trace(model, x, analyze=False), layernorm_streams="prune"), seed)
    plan = plan_by_importance(gm, 0.5, importance="random", seed=seed, scope="group")  # one set per stream
    pruned, ref = prune(gm, plan, strategy_macs=False).module, masked_reference(gm, plan)
    with torch.no_grad():
        y, y_ref, y_full = pruned(x), ref(x), gm(x)
    assert_close(y, y_ref, float(y_ref.abs().max()))
    assert (y_full - y_ref).abs().max() > 1e-3  # the statistics really changed


@settings(max_examples=25, deadline=None)
@given(
    op=st.sampled_from(["mean", "sum", "var", "std", "var_mean", "std_mean"]),
    keepdim=st.booleans(),
    correction=st.sampled_from([0.0, 1.0]),
    dims=st.sampled_from([(1,), (1, 2), (2, 1), (0, 1, 2)]),
    seed=st.integers(0, 1000),
)
def test_masked_reduction_is_the_reduction_over_the_kept_positions(op, keepdim, correction, dims, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, 4, generator=g)
    kept = sorted(torch.randperm(6, generator=g)[:4].tolist())
    mask = torch.zeros(1, 6, 1)
    mask[0, kept] = 1.0
    got = masked_reduction(x, op, dims, keepdim, correction, mask)
    sub = x[:, kept]
    fn = getattr(torch, op)
    want = fn(sub, dims, keepdim=keepdim) if op in ("mean", "sum") else fn(sub, dims, correction=correction,
                                                                           keepdim=keepdim)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b)


def test_masked_rms_norm_is_rms_norm_over_the_kept_units():
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 0])
    kept = mask.bool()
    out = masked_rms_norm(x, (8,), w * mask, 1e-6, mask)
    torch.testing.assert_close(out[..., kept], F.rms_norm(x[..., kept], (5,), w[kept], 1e-6))
    assert out[..., ~kept].abs().max() == 0
