"""``torch.einsum`` in the unit-group analysis: parsed from its equation, exact under physical prune."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers.pruning import assert_close, expected_params, random_plan, randomized

from zoocompiler.core.modules import count_params
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.rewrite.prune import masked_reference, prune


class EinsumAttention(nn.Module):
    """Multi-head self-attention written with einsum (scores, weighted sum, a permutation), as maxvit and many
    research models write it; then an einsum contraction of two linear maps' features."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.a = nn.Linear(dim, 12)
        self.b = nn.Linear(dim, 12)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
        y = torch.einsum("bhij,bhjd->bhid", att, v)
        y = torch.einsum("bhid->bihd", y).reshape(n, t, d)
        y = self.proj(y) + x
        mix = torch.einsum("bic,bjc->bij", self.a(y), self.b(y))  # contracts the units of a and b
        return self.head(mix.mean(1))


def _einsum_reasons(gm) -> list[str]:
    return [r for g in graph_info(gm).unit_groups for r in g.reasons if "einsum" in r]


def test_einsum_groups_are_prunable_and_pruned_equals_masked():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    gm = randomized(trace(EinsumAttention().eval(), x))
    assert _einsum_reasons(gm) == []
    groups = graph_info(gm).unit_groups
    heads = [g for g in groups if g.kind == "head" and not g.pinned]
    assert heads and heads[0].size == 2  # the two heads became units through the einsum contraction
    a_b = [g for g in groups if not g.pinned and any(m.param == "a.weight" for m in g.members)]
    assert a_b and any(m.param == "b.weight" for m in a_b[0].members)  # a and b are coupled by the contraction
    plan = random_plan(gm, seed=3)
    assert plan.keep
    result = prune(gm, plan, strategy_macs=False)
    with torch.no_grad():
        ref = gm(x)
        assert_close(result.module(x), masked_reference(gm, plan)(x), float(ref.abs().max()))
    assert count_params(result.module) == expected_params(gm, plan) < count_params(gm)


@pytest.mark.parametrize(
    "equation",
    ["bij,bjk", "b...j,bjk->b...k", "bij,bjk->bk", "bii->bi", "bij,bjk,bkl->bil", "bij,bkj->bik j"],
)
def test_einsum_forms_it_does_not_follow_pin_with_a_reason(equation):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            p, q = self.a(x), self.b(x)
            if equation == "bii->bi":
                return torch.einsum(equation, p)
            if equation.count(",") == 2:
                return torch.einsum(equation, p, q, q)
            return torch.einsum(equation.replace(" ", ""), p, q)

    gm = trace(Odd().eval(), torch.randn(2, 4, 4))
    reasons = _einsum_reasons(gm)
    assert reasons, "an einsum this rule does not follow must pin the units it touches"
    assert all("\n" not in r for r in reasons)


@pytest.mark.slow
def test_maxvit_einsum_attention_is_prunable_and_exact():
    """torchvision maxvit_t writes its attention with einsum: without the rule 66 of its 119 groups were pinned by
    einsum; with it no group is, and a random plan prunes it exactly (pruned == masked, exact parameter count)."""
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    gm = randomized(trace(torchvision.models.maxvit_t(num_classes=10).eval(), x))
    groups = graph_info(gm).unit_groups
    assert _einsum_reasons(gm) == [] and sum(not g.pinned for g in groups) >= 60
    plan = random_plan(gm, seed=5)
    result = prune(gm, plan, strategy_macs=False)
    with torch.no_grad():
        ref = gm(x)
        assert_close(result.module(x), masked_reference(gm, plan)(x), float(ref.abs().max()))
    assert count_params(result.module) == expected_params(gm, plan) < count_params(gm)
