"""DeRy partition solver: exact DP vs brute force, swap search, the zoo alternation, planted recovery, errors."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoocompiler.core.errors import SolverError
from zoocompiler.solvers.partition import (
    BlockRef,
    ModelPositions,
    Partition,
    _run_restart,
    _ZooArrays,
    best_partition_for_anchors,
    block_similarity,
    block_size_cap,
    min_feasible_eps,
    partition_zoo,
    swap_partition_for_anchors,
)

# --------------------------------------------------------------------------------------------------------------
# Synthetic zoos


def gram_zoo(rng: np.random.Generator, lengths: list[int], dim: int = 6, zero_prob: float = 0.0):
    """Models with random unit vectors per position; C = Gram matrix (symmetric PSD, unit diagonal)."""
    models, offset = [], 0
    for i, length in enumerate(lengths):
        sizes = rng.uniform(0.1, 3.0, size=length)
        sizes[rng.random(length) < zero_prob] = 0.0
        models.append(ModelPositions(f"m{i}", offset, tuple(float(x) for x in sizes)))
        offset += length + 1
    vectors = rng.normal(size=(offset, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    C = vectors @ vectors.T
    np.fill_diagonal(C, 1.0)
    return C, models


def all_partitions(length: int, k: int):
    for inner in itertools.combinations(range(1, length), k - 1):
        yield (0, *inner, length)


def block_size(model: ModelPositions, start: int, end: int) -> float:
    cum = np.concatenate([[0.0], np.cumsum(model.segment_sizes)])
    return float(cum[end] - cum[start])


def fits(model: ModelPositions, bounds, cap: float) -> bool:
    return all(block_size(model, s, e) <= cap for s, e in zip(bounds[:-1], bounds[1:]))


def brute_force(C, models, i, anchors, k, cap) -> float:
    """max over all feasible boundary tuples that keep model i's anchors as blocks of Σ max_j S(block, a_j)."""
    model = models[i]
    own = {(a.start, a.end) for a in anchors if a.model == i}
    best = -math.inf
    for bounds in all_partitions(model.length, k):
        blocks = [BlockRef(i, s, bounds[s], bounds[s + 1]) for s in range(k)]
        if not fits(model, bounds, cap) or not own <= {(b.start, b.end) for b in blocks}:
            continue
        best = max(best, sum(max(block_similarity(C, models, b, a) for a in anchors) for b in blocks))
    return best


def check_partition_shape(bounds, length: int, k: int) -> None:
    assert len(bounds) == k + 1 and bounds[0] == 0 and bounds[-1] == length
    assert all(a < b for a, b in zip(bounds[:-1], bounds[1:]))


def recomputed_objective(C, models, partition: Partition) -> float:
    return sum(block_similarity(C, models, b, partition.anchors[partition.set_of(b)]) for b in partition.blocks())


@st.composite
def anchored_instances(draw):
    """A random zoo, a feasible partition per model, K distinct anchors from those blocks, one model to re-solve."""
    k = draw(st.integers(2, 4))
    lengths = draw(st.lists(st.integers(k, 9), min_size=1, max_size=3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    C, models = gram_zoo(rng, lengths, zero_prob=0.2)
    eps = draw(st.floats(0.0, 1.0))
    caps = [block_size_cap(m, k, max(eps, min_feasible_eps(m, k))) for m in models]
    current = []
    for model, cap in zip(models, caps):
        feasible = [b for b in all_partitions(model.length, k) if fits(model, b, cap)]
        current.append(feasible[rng.integers(len(feasible))])
    blocks = [BlockRef(i, s, b[s], b[s + 1]) for i, b in enumerate(current) for s in range(k)]
    anchors = [blocks[j] for j in rng.choice(len(blocks), size=k, replace=False)]
    i = draw(st.integers(0, len(models) - 1))
    return C, models, i, anchors, k, caps[i], current[i]


# --------------------------------------------------------------------------------------------------------------
# Per-model solvers


@settings(max_examples=200)
@given(anchored_instances())
def test_dp_equals_brute_force_and_swap_never_beats_it(instance):
    C, models, i, anchors, k, cap, start = instance
    model = models[i]
    bounds, sets, objective = best_partition_for_anchors(C, model, i, anchors, k, cap, models=models)
    assert objective == pytest.approx(brute_force(C, models, i, anchors, k, cap), abs=1e-9)
    swapped, swap_sets, swap_objective = swap_partition_for_anchors(
        C, model, i, anchors, k, cap, start, models=models
    )
    assert swap_objective <= objective + 1e-9
    for b, s, value in ((bounds, sets, objective), (swapped, swap_sets, swap_objective)):
        check_partition_shape(b, model.length, k)
        assert fits(model, b, cap)
        own = {(a.start, a.end) for a in anchors if a.model == i}
        assert own <= set(zip(b[:-1], b[1:]))  # the model's anchors stay blocks
        blocks = [BlockRef(i, st_, b[st_], b[st_ + 1]) for st_ in range(k)]
        assert value == pytest.approx(sum(block_similarity(C, models, blk, anchors[j]) for blk, j in zip(blocks, s)))
        for blk, j in zip(blocks, s):  # each block sits with its best anchor
            best = max(block_similarity(C, models, blk, a) for a in anchors)
            assert block_similarity(C, models, blk, anchors[j]) == pytest.approx(best)


def test_swap_stops_at_a_local_optimum_that_dp_escapes():
    # Model 0 (L=6, K=2) against one anchor, model 1's block (0, 2): a partition (0, b, 6) scores
    # const + C[b, out(anchor)], which is 0.5, 0.1, 0.1, 0.9, 0.2 for b = 1..5: b=1 is a local optimum.
    models = [ModelPositions("m", 0, (1.0,) * 6), ModelPositions("anchor", 7, (1.0, 1.0))]
    C = np.eye(10)
    anchor_out = 9
    for b, value in zip(range(1, 6), [0.5, 0.1, 0.1, 0.9, 0.2]):
        C[b, anchor_out] = C[anchor_out, b] = value
    anchors = [BlockRef(1, 0, 0, 2)]
    cap = block_size_cap(models[0], 2, 1.0)  # every block of size <= 6 fits
    dp = best_partition_for_anchors(C, models[0], 0, anchors, 2, cap, models=models)
    assert dp[0] == (0, 4, 6) and dp[1] == (0, 0)
    stuck = swap_partition_for_anchors(C, models[0], 0, anchors, 2, cap, (0, 1, 6), models=models)
    assert stuck[0] == (0, 1, 6) and stuck[2] == pytest.approx(dp[2] - 0.4)
    climbed = swap_partition_for_anchors(C, models[0], 0, anchors, 2, cap, (0, 3, 6), models=models)
    assert climbed[0] == (0, 4, 6) and climbed[2] == pytest.approx(dp[2])
    back = swap_partition_for_anchors(C, models[0], 0, anchors, 2, cap, (0, 2, 6), models=models)
    assert back[0] == (0, 1, 6)  # Eq. 6: the better of the forward (0.1, a tie) and backward (0.5) move


def test_swap_rejects_an_infeasible_start():
    C, models = gram_zoo(np.random.default_rng(0), [5])
    anchors = [BlockRef(0, 0, 0, 2), BlockRef(0, 1, 2, 5)]
    cap = block_size_cap(models[0], 2, 5.0)
    with pytest.raises(SolverError, match="not a feasible 2-partition"):
        swap_partition_for_anchors(C, models[0], 0, anchors, 2, cap, (0, 3, 5), models=models)  # splits an anchor


@settings(max_examples=60)
@given(st.integers(1, 4), st.integers(0, 4), st.integers(0, 2**32 - 1))
def test_min_feasible_eps_is_exact(k, extra, seed):
    rng = np.random.default_rng(seed)
    _, (model,) = gram_zoo(rng, [k + extra], zero_prob=0.2)
    total = model.total_size
    best_max = min(max(block_size(model, s, e) for s, e in zip(b[:-1], b[1:])) for b in all_partitions(model.length, k))
    eps = min_feasible_eps(model, k)
    assert eps == pytest.approx(max(0.0, best_max * k / total - 1.0) if total > 0 else 0.0, abs=1e-12)
    feasible_at = [b for b in all_partitions(model.length, k) if fits(model, b, block_size_cap(model, k, eps))]
    assert feasible_at
    if eps > 1e-6:
        tighter = (1.0 + eps - 1e-6) * total / k
        assert not any(fits(model, b, tighter) for b in all_partitions(model.length, k))


# --------------------------------------------------------------------------------------------------------------
# The zoo solver


@settings(max_examples=60)
@given(
    st.integers(2, 4),
    st.lists(st.integers(4, 12), min_size=1, max_size=5),
    st.sampled_from(["dp", "swap"]),
    st.integers(0, 2**32 - 1),
)
def test_restart_objective_never_decreases(k, lengths, method, seed):
    rng = np.random.default_rng(seed)
    C, models = gram_zoo(rng, lengths, zero_prob=0.1)
    caps = [block_size_cap(m, k, max(0.2, min_feasible_eps(m, k))) for m in models]
    arrays = _ZooArrays.build(C, models, caps)
    state, trace = _run_restart(arrays, arrays.partition_counts(k), rng, method)
    assert len(trace) >= 3
    assert all(b >= a - 1e-9 for a, b in zip(trace[:-1], trace[1:]))
    assert state.objective == pytest.approx(trace[-1])


@settings(max_examples=40)
@given(
    st.integers(2, 4),
    st.lists(st.integers(4, 10), min_size=1, max_size=5),
    st.sampled_from(["dp", "swap"]),
    st.integers(0, 2**32 - 1),
)
def test_partition_zoo_is_consistent(k, lengths, method, seed):
    C, models = gram_zoo(np.random.default_rng(seed), lengths, zero_prob=0.1)
    p = partition_zoo(C, models, k=k, eps=0.2, restarts=5, seed=seed % 1000, method=method)
    assert p.k == k and p.method == method and len(p.restart_objectives) == 5
    assert p.objective == pytest.approx(recomputed_objective(C, models, p), abs=1e-12)
    assert p.objective == pytest.approx(max(p.restart_objectives), abs=1e-9)
    for i, (model, bounds) in enumerate(zip(models, p.boundaries)):
        check_partition_shape(bounds, model.length, k)
        assert p.effective_eps[i] >= 0.2
        assert fits(model, bounds, block_size_cap(model, k, p.effective_eps[i]))
    assert len(p.anchors) == k
    blocks = p.blocks()
    assert len(blocks) == k * len(models)
    for j, anchor in enumerate(p.anchors):
        assert anchor in blocks and p.set_of(anchor) == j
    sets = p.equivalence_sets()
    assert sorted(b for members in sets for b in members) == sorted(blocks)
    assert all(members for members in sets)
    mean_stage = [np.mean([b.stage for b in members]) for members in sets]
    assert mean_stage == sorted(mean_stage)  # sets are labelled in order of depth


def test_partition_zoo_is_reproducible_and_reports_progress():
    C, models = gram_zoo(np.random.default_rng(7), [8, 10, 9, 12, 7], dim=8)
    calls = []
    first = partition_zoo(C, models, k=3, restarts=12, seed=5, progress=lambda r, obj: calls.append((r, obj)))
    second = partition_zoo(C, models, k=3, restarts=12, seed=5)
    other = partition_zoo(C, models, k=3, restarts=12, seed=6)
    a, b = first.to_dict(), second.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert other.restart_objectives != first.restart_objectives
    assert [r for r, _ in calls] == list(range(12))
    assert [obj for _, obj in calls] == first.restart_objectives


def test_to_dict_round_trips_through_json():
    C, models = gram_zoo(np.random.default_rng(1), [6, 7, 8])
    p = partition_zoo(C, models, k=3, restarts=3, seed=0)
    back = Partition.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p
    assert back.model_names == ["m0", "m1", "m2"]


def test_set_of_rejects_a_block_that_is_not_in_the_partition():
    C, models = gram_zoo(np.random.default_rng(1), [6, 7])
    p = partition_zoo(C, models, k=2, restarts=2, seed=0)
    b = p.boundaries[0]
    with pytest.raises(ValueError, match="not a block"):
        p.set_of(BlockRef(0, 0, b[0], b[1] + 1))


def planted_zoo(rng: np.random.Generator, n_models: int, k: int = 4, dim: int = 256, decay: float = 0.8):
    """Models whose planted stage ends share one hidden vector per stage across the zoo.

    A position d steps from its nearest planted position is decay**d of that stage vector plus a private random
    part, so the planted partition is the unique optimum and similarity rises towards it (a funnel for swaps).
    """
    stage_vectors = rng.normal(size=(k + 1, dim))
    stage_vectors /= np.linalg.norm(stage_vectors, axis=1, keepdims=True)
    vectors, models, planted, offset = [], [], [], 0
    for i in range(n_models):
        length = int(rng.integers(9, 14))
        cuts = np.sort(rng.choice(np.arange(1, length), size=k - 1, replace=False))
        while np.diff(np.r_[0, cuts, length]).max() > 1.5 * length / k:  # keep the planted blocks balanced
            cuts = np.sort(rng.choice(np.arange(1, length), size=k - 1, replace=False))
        bounds = np.array([0, *cuts, length])
        private = rng.normal(size=(length + 1, dim))
        private /= np.linalg.norm(private, axis=1, keepdims=True)
        for position in range(length + 1):
            distance = np.abs(bounds - position)
            weight = decay ** distance.min()
            v = weight * stage_vectors[distance.argmin()] + math.sqrt(1 - weight**2) * private[position]
            vectors.append(v)
        models.append(ModelPositions(f"planted{i}", offset, (1.0,) * length))
        planted.append(tuple(int(b) for b in bounds))
        offset += length + 1
    v = np.array(vectors)
    C = v @ v.T
    np.fill_diagonal(C, 1.0)
    return C, models, planted


@pytest.mark.parametrize("method", ["dp", "swap"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_stages_are_recovered(seed, method):
    C, models, planted = planted_zoo(np.random.default_rng(seed), n_models=6)
    p = partition_zoo(C, models, k=4, eps=0.5, restarts=40 if method == "swap" else 20, seed=seed, method=method)
    assert p.boundaries == planted
    assert p.sets == [(0, 1, 2, 3)] * len(models)  # every set is one planted stage
    assert [a.stage for a in p.anchors] == [0, 1, 2, 3]
    assert p.effective_eps == [0.5] * len(models)


# --------------------------------------------------------------------------------------------------------------
# Size balance and errors


def lopsided_zoo():
    """m0 is balanced; 'fat' holds most of its size in one segment, so eps=0.2 admits no 2-partition."""
    models = [ModelPositions("m0", 0, (1.0, 1.0, 1.0, 1.0)), ModelPositions("fat", 5, (10.0, 1.0, 1.0, 1.0, 1.0))]
    C, _ = gram_zoo(np.random.default_rng(0), [4, 5])
    return C, models


def test_size_relax_lifts_eps_only_where_needed():
    C, models = lopsided_zoo()
    needed = min_feasible_eps(models[1], 2)
    assert needed == pytest.approx(10.0 * 2 / 14.0 - 1.0)
    p = partition_zoo(C, models, k=2, eps=0.2, restarts=3)
    assert p.effective_eps == [0.2, pytest.approx(needed)]
    assert p.boundaries[1] == (0, 1, 5)  # the only partition with max block 10
    assert p.eps == 0.2


def test_size_relax_false_names_the_model_and_the_smallest_eps():
    C, models = lopsided_zoo()
    with pytest.raises(SolverError, match=r"model 'fat'.*eps=0\.2.*use eps >= 0\.4286"):
        partition_zoo(C, models, k=2, eps=0.2, restarts=3, size_relax=False)
    p = partition_zoo(C, models, k=2, eps=0.4286, restarts=3, size_relax=False)  # the suggested eps works
    assert p.effective_eps == [0.4286, 0.4286]


def test_fewer_positions_than_blocks_is_an_error():
    C, models = gram_zoo(np.random.default_rng(0), [6, 2])
    with pytest.raises(SolverError, match=r"model 'm1' has L=2 .* fewer than k=3 .* use k <= 2"):
        partition_zoo(C, models, k=3)
    with pytest.raises(SolverError, match="L=2"):
        min_feasible_eps(models[1], 3)


def test_malformed_inputs_are_errors():
    C, models = gram_zoo(np.random.default_rng(0), [5, 5])
    bad = C.copy()
    bad[1, 7] = bad[7, 1] = np.nan
    with pytest.raises(SolverError, match="missing"):
        partition_zoo(bad, models, k=2, restarts=1)
    asym = C.copy()
    asym[1, 7] += 0.1
    with pytest.raises(SolverError, match="not symmetric"):
        partition_zoo(asym, models, k=2, restarts=1)
    with pytest.raises(SolverError, match="rows 6..11"):
        partition_zoo(C[:11, :11], models, k=2, restarts=1)
    with pytest.raises(SolverError, match="unknown partition method 'kl'"):
        partition_zoo(C, models, k=2, method="kl")
    with pytest.raises(SolverError, match="missing entry"):
        block_similarity(bad, models, BlockRef(0, 0, 1, 2), BlockRef(1, 0, 1, 3))


def test_no_partition_for_anchors_is_an_error():
    C, models = gram_zoo(np.random.default_rng(0), [6])
    overlapping = [BlockRef(0, 0, 0, 3), BlockRef(0, 1, 2, 6)]  # both pinned, they overlap
    with pytest.raises(SolverError, match="no 2-block partition"):
        best_partition_for_anchors(C, models[0], 0, overlapping, 2, block_size_cap(models[0], 2, 5.0), models=models)



# --------------------------------------------------------------------------------------------------------------
# Distinct equivalence sets: each model's K blocks in K different sets


def brute_force_distinct(C, models, i, anchors, k, cap) -> float:
    """max over feasible partitions keeping model i's anchors as blocks (in their own sets) and over every
    assignment of the K blocks to K different sets, of Σ S(block, anchor of its set)."""
    model = models[i]
    own = {(a.start, a.end): j for j, a in enumerate(anchors) if a.model == i}
    best = -math.inf
    for bounds in all_partitions(model.length, k):
        blocks = [BlockRef(i, s, bounds[s], bounds[s + 1]) for s in range(k)]
        if not fits(model, bounds, cap) or not set(own) <= {(b.start, b.end) for b in blocks}:
            continue
        for perm in itertools.permutations(range(k)):
            if any(own.get((b.start, b.end), j) != j for b, j in zip(blocks, perm)):
                continue
            best = max(best, sum(block_similarity(C, models, b, anchors[j]) for b, j in zip(blocks, perm)))
    return best


@settings(max_examples=150)
@given(anchored_instances())
def test_distinct_dp_equals_brute_force(instance):
    C, models, i, anchors, k, cap, _ = instance
    bounds, sets, objective = best_partition_for_anchors(C, models[i], i, anchors, k, cap, models=models,
                                                         distinct=True)
    assert objective == pytest.approx(brute_force_distinct(C, models, i, anchors, k, cap), abs=1e-9)
    assert sorted(sets) == list(range(k))  # K different sets
    blocks = [BlockRef(i, s, bounds[s], bounds[s + 1]) for s in range(k)]
    assert objective == pytest.approx(sum(block_similarity(C, models, b, anchors[j]) for b, j in zip(blocks, sets)))
    for j, a in enumerate(anchors):  # the model's anchors stay blocks, in their own sets
        if a.model == i:
            assert sets[[(b.start, b.end) for b in blocks].index((a.start, a.end))] == j
    _, _, free = best_partition_for_anchors(C, models[i], i, anchors, k, cap, models=models)
    assert objective <= free + 1e-9  # a constraint never helps


@settings(max_examples=25)
@given(st.integers(2, 4), st.lists(st.integers(4, 10), min_size=1, max_size=5), st.integers(0, 2**32 - 1))
def test_distinct_partition_zoo(k, lengths, seed):
    rng = np.random.default_rng(seed)
    C, models = gram_zoo(rng, lengths, zero_prob=0.1)
    p = partition_zoo(C, models, k=k, eps=0.2, restarts=4, seed=seed % 1000, distinct=True)
    assert p.distinct and all(sorted(s) == list(range(k)) for s in p.sets)
    assert all(len(members) == len(models) for members in p.equivalence_sets())  # every set: one block per model
    assert p.objective == pytest.approx(recomputed_objective(C, models, p), abs=1e-12)
    assert Partition.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    caps = [block_size_cap(m, k, max(0.2, min_feasible_eps(m, k))) for m in models]
    arrays = _ZooArrays.build(C, models, caps)
    _, trace = _run_restart(arrays, arrays.partition_counts(k), rng, "dp", distinct=True)
    assert all(b >= a - 1e-9 for a, b in zip(trace[:-1], trace[1:]))  # J never decreases


def test_distinct_needs_the_dp_and_a_small_k():
    C, models = gram_zoo(np.random.default_rng(0), [12, 12])
    with pytest.raises(SolverError, match="need the exact DP"):
        partition_zoo(C, models, k=3, restarts=1, method="swap", distinct=True)
    C, models = gram_zoo(np.random.default_rng(0), [12, 12])
    with pytest.raises(SolverError, match="2\\^9 DP states"):
        partition_zoo(C, models, k=9, eps=10.0, restarts=1, distinct=True)
