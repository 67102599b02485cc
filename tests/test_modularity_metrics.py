"""MwT's losses (Eqs. 4–5) against a direct, loop-by-loop implementation, the Jaccard metrics (Eqs. 1–3)
on hand-made kernel sets, and module masks by threshold with the empty-layer rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from zoocompiler.pipelines.modularize.losses import cohesion_loss, coupling_loss
from zoocompiler.pipelines.modularize.metrics import (
    batch_metrics,
    cohesion,
    coupling,
    jaccard,
    jaccard_matrix,
    module_masks,
    module_table,
)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a[None], b[None]).item())


def _direct_cohesion_loss(masks: torch.Tensor, labels: torch.Tensor) -> float:
    """Eq. 4 literally: classes with ≥ 2 samples, pairs j < k."""
    per_class = []
    for c in labels.unique().tolist():
        rows = masks[labels == c]
        n = len(rows)
        if n < 2:
            continue
        pairs = [_cos(rows[j], rows[k]) for j, k in itertools.combinations(range(n), 2)]
        per_class.append(sum(pairs) / (n * (n - 1) / 2))
    return 1 - sum(per_class) / len(per_class) if per_class else 0.0


def _direct_coupling_loss(masks: torch.Tensor, labels: torch.Tensor) -> float:
    """Eq. 5 literally: class pairs h < i, every cross pair of samples."""
    classes = labels.unique().tolist()
    n = len(classes)
    if n < 2:
        return 0.0
    total = 0.0
    for h, i in itertools.combinations(classes, 2):
        a, b = masks[labels == h], masks[labels == i]
        total += sum(_cos(x, y) for x in a for y in b) / (len(a) * len(b))
    return 2 / (n * n - n) * total


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(2, 12), kernels=st.integers(1, 9), classes=st.integers(1, 4))
def test_losses_equal_a_direct_implementation_of_eqs_4_and_5(seed, batch, kernels, classes):
    g = torch.Generator().manual_seed(seed)
    masks = torch.relu(torch.rand(batch, kernels, generator=g) - 0.3)  # [0, 1), with exact zeros
    labels = torch.randint(0, classes, (batch,), generator=g)
    assert cohesion_loss(masks, labels).item() == pytest.approx(_direct_cohesion_loss(masks, labels), abs=1e-5)
    assert coupling_loss(masks, labels).item() == pytest.approx(_direct_coupling_loss(masks, labels), abs=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.integers(1, 7))
def test_layered_losses_are_the_mean_over_layers(seed, cut):
    g = torch.Generator().manual_seed(seed)
    masks = torch.relu(torch.rand(10, 8, generator=g) - 0.3)
    labels = torch.randint(0, 3, (10,), generator=g)
    layers = [(0, cut), (cut, 8)]
    for loss, direct in ((cohesion_loss, _direct_cohesion_loss), (coupling_loss, _direct_coupling_loss)):
        want = np.mean([direct(masks[:, a:b], labels) for a, b in layers])
        assert loss(masks, labels, layers).item() == pytest.approx(want, abs=1e-5)


def test_losses_at_their_extremes_and_gradients_flow():
    labels = torch.tensor([0, 0, 1, 1])
    disjoint = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], requires_grad=True)
    assert cohesion_loss(disjoint, labels).item() == pytest.approx(0.0, abs=1e-6)  # identical within classes
    assert coupling_loss(disjoint, labels).item() == pytest.approx(0.0, abs=1e-6)  # orthogonal across classes
    same = torch.ones(4, 4)
    assert coupling_loss(same, labels).item() == pytest.approx(1.0)
    (cohesion_loss(disjoint, labels) + coupling_loss(disjoint, labels)).backward()
    assert disjoint.grad is not None and torch.isfinite(disjoint.grad).all()


def test_jaccard_on_hand_made_sets():
    a = np.array([1, 1, 0, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 1, 1], dtype=bool)
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert jaccard(a, a) == 1.0
    assert jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 0.0  # two empty sets: no shared kernel
    assert jaccard(a, ~a) == 0.0


def test_cohesion_and_coupling_on_hand_made_sets():
    samples = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=bool)
    # pairs: {0,1}{0,1,2} = 2/3, {0,1}{0} = 1/2, {0,1,2}{0} = 1/3  (Eq. 2)
    assert cohesion(samples) == pytest.approx((2 / 3 + 1 / 2 + 1 / 3) / 3)
    assert math.isnan(cohesion(samples[:1]))
    modules = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=bool)
    # pairs: 1/3, 0, 1/3  (Eq. 3, averaged)
    assert coupling(modules) == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    assert np.allclose(jaccard_matrix(modules), jaccard_matrix(modules).T)


def test_batch_metrics_use_unions_per_class_and_skip_singletons():
    sets = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]], dtype=bool)
    labels = np.array([0, 0, 1, 2])
    coh, coup, rate = batch_metrics(sets, labels)
    assert coh == pytest.approx(1 / 2)  # only class 0 has two samples: J({0,1},{0}) = 1/2
    unions = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]], dtype=bool)
    assert coup == pytest.approx(coupling(unions))
    assert rate == pytest.approx(sets.mean())


def test_module_masks_threshold_and_empty_layer_rule():
    # 2 classes, 10 samples each; kernels 0-2 are layer 0, kernels 3-4 layer 1
    counts = np.array([[10, 9, 1, 8, 8], [0, 2, 10, 1, 0]])
    totals = np.array([10, 10])
    mm = module_masks(counts, totals, 0.85, [(0, 3), (3, 5)])
    assert mm.masks[0, :3].tolist() == [True, True, False]  # 1.0 and 0.9 > 0.85
    assert mm.masks[1, :3].tolist() == [False, False, True]
    # class 0's layer 1 (0.8, 0.8) is empty at 0.85: lowered by 0.05 to 0.8 → still empty (not >), then 0.75
    assert mm.masks[0, 3:].tolist() == [True, True] and mm.lowered[0] == {1: pytest.approx(0.75)}
    assert mm.masks[1, 3:].tolist() == [True, False] and mm.lowered[1][1] == pytest.approx(0.05)
    assert mm.union([0, 1]).tolist() == [True, True, True, True, True]


def test_a_layer_no_sample_uses_keeps_one_kernel():
    mm = module_masks(np.array([[5, 5, 0, 0, 0]]), np.array([10]), 0.9, [(0, 2), (2, 5)])
    assert mm.masks[0, 2:].tolist() == [True, False, False] and mm.lowered[0][1] == 0.0
    assert mm.masks[0, :2].tolist() == [True, True] and mm.lowered[0][0] == pytest.approx(0.45)


def test_module_table_reports_krr_cohesion_coupling():
    masks = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=bool)
    sets = [np.array([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool), np.array([[0, 0, 1, 1], [0, 0, 1, 0]], dtype=bool)]
    table = module_table(masks, sets)
    assert table["krr"] == pytest.approx(0.5)
    assert table["coupling"] == 0.0
    assert table["per_module"][0]["cohesion"] == 1.0 and table["per_module"][1]["cohesion"] == pytest.approx(0.5)
    assert table["cohesion"] == pytest.approx(0.75)


def test_the_torch_free_config_mirrors_the_pass_choices():
    from zoocompiler.passes.rewrite import mask_generators
    from zoocompiler.pipelines.modularize import config

    assert config.SEMANTICS == mask_generators.SEMANTICS
    assert config.RESIDUAL_LAYOUTS == mask_generators.RESIDUAL_LAYOUTS
