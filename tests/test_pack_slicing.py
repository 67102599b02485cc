"""S&P slicing and packing pieces: the ℓ₂,₁ norm and unit selection on hand-made tensors, packing leaves fragments
untouched, the folded standardisation is exact, the sampler draws k per class, and one real class slice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from zoocompiler.core.errors import DataError, TrainingError, ZooError
from zoocompiler.data import DataSplit
from zoocompiler.pipelines.pack.packing import PackedModel, PackSettings, _fold_standardisation, train_pack
from zoocompiler.pipelines.pack.samples import draw_samples, source_seed
from zoocompiler.pipelines.pack.slicing import l21, select_units, unit_norms


def test_l21_on_a_hand_made_tensor():
    # two samples, two units of 2 positions: unit norms [5, 0] and [0, 1]
    z = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    assert unit_norms(z, 1).tolist() == [[5.0, 0.0], [0.0, 1.0]]
    assert l21(z, 1).item() == pytest.approx((5.0 + 1.0) / 2)
    # units on the last dim (a linear layer on tokens): same values
    assert l21(z.transpose(1, 2).contiguous(), 2).item() == pytest.approx(3.0)


@given(u=st.integers(1, 300), beta=st.floats(0.001, 1.0), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_rate_keeps_exactly_ceil_beta_u(u, beta, seed):
    scores = torch.rand(u, generator=torch.Generator().manual_seed(seed))
    kept = select_units(scores, "rate", beta)
    assert len(kept) == max(1, math.ceil(beta * u - 1e-9))
    assert kept == sorted(kept)
    rest = sorted(set(range(u)) - set(kept))
    if rest:
        assert min(float(scores[j]) for j in kept) >= max(float(scores[j]) for j in rest)


def test_threshold_rule():
    scores = torch.tensor([1.0, 0.2, 0.5, 0.31, 0.0])
    assert select_units(scores, "threshold", 0.7) == [0, 2, 3]  # s / max > 0.3
    assert select_units(scores, "threshold", 1.0) == [0, 1, 2, 3]  # > 0: every active unit
    assert select_units(scores, "threshold", 1e-6) == [0]  # only the best
    assert select_units(torch.zeros(4), "threshold", 0.5) == [0]  # nothing active: one unit stays


def test_selection_rejects_bad_options():
    with pytest.raises(ZooError, match="outside"):
        select_units(torch.ones(3), "rate", 0.0)
    with pytest.raises(ZooError, match="outside"):
        select_units(torch.ones(3), "threshold", 1.5)
    with pytest.raises(ZooError, match="unknown selection"):
        select_units(torch.ones(3), "top", 0.5)


def test_folded_standardisation_is_exact():
    torch.manual_seed(0)
    enc = nn.Linear(6, 4)
    mean, std = torch.randn(6), torch.rand(6) + 0.5
    x = torch.randn(10, 6)
    folded = _fold_standardisation(enc, mean, std)
    torch.testing.assert_close(folded(x), enc((x - mean) / std), atol=1e-5, rtol=1e-5)


def _fragments() -> list[nn.Module]:
    torch.manual_seed(1)
    return [nn.Sequential(nn.Flatten(1), nn.Linear(16, 5), nn.ReLU()), nn.Sequential(nn.Flatten(1), nn.Linear(16, 3))]


def test_packing_never_updates_a_fragment():
    frags = _fragments()
    before = [{k: v.clone() for k, v in f.state_dict().items()} for f in frags]
    x = torch.randn(12, 1, 4, 4)
    y = torch.arange(12) % 2
    with torch.no_grad():
        feats = [f(x) for f in frags]
    trained = train_pack(feats, y, 2, PackSettings(steps=30))
    model = PackedModel(frags, trained.encoder, trained.head, [3, 7])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()  # even a stray backward through the packed model must not move them: nothing steps them
    for f, state in zip(frags, before, strict=True):
        for k, v in f.state_dict().items():
            assert torch.equal(v, state[k]), k
    assert trained.losses[-1] < trained.losses[0]
    assert model(x).shape == (12, 2)


def test_packing_stops_on_a_non_finite_loss():
    x = torch.randn(6, 3)
    x[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="1 non-finite value"):
        train_pack([x], torch.tensor([0, 1, 0, 1, 0, 1]), 2, PackSettings(steps=3))


def _split(per_class: list[int]) -> DataSplit:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1, 1)
    return DataSplit(x, y, tuple(range(len(per_class))), len(per_class), "toy")


def test_sampler_draws_k_per_class_reproducibly():
    split = _split([7, 9, 8])
    a = draw_samples(split, 5, 0, "m")
    assert torch.bincount(a.y).tolist() == [5, 5, 5]
    assert torch.equal(a.x, draw_samples(split, 5, 0, "m").x)
    assert not torch.equal(a.x, draw_samples(split, 5, 0, "other").x)
    assert source_seed(0, "m") != source_seed(1, "m")


def test_sampler_refuses_k_above_a_class_count():
    with pytest.raises(DataError, match="fewer than k=8"):
        draw_samples(_split([7, 9]), 8, 0, "m")


@pytest.mark.slow
def test_one_class_slice_on_the_vgg_source():
    """A real (short) slice: the fragment equals the repaired net at its features and keeps fewer units."""
    from zoocompiler.passes.analysis import trace
    from zoocompiler.passes.rewrite.repairs import slice_layers
    from zoocompiler.pipelines.pack.slicing import SliceSettings, slice_class
    from zoocompiler.zoo import build_model

    gm = trace(build_model("vgg_s_0to3").eval(), torch.randn(2, 1, 28, 28))
    layers = slice_layers(gm)
    x = torch.randn(8, 1, 28, 28)
    y = torch.arange(8) % 4
    sliced = slice_class(gm, layers, x, y, 1, SliceSettings(select="rate", beta=0.5, pool_steps=2, adapt_steps=2,
                                                            combine_steps=2, head_steps=5))
    assert [len(k) for k in sliced.kept] == [math.ceil(0.5 * u) for u in sliced.units]
    assert sliced.fragment.repairs_left == 0
    assert sliced.fragment.module(x).shape == (8, len(sliced.fragment.features))
