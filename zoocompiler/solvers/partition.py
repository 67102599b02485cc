"""DeRy network partition: cut every zoo model into K blocks and group the blocks into K equivalence sets.

Paper: Deep Model Reassembly, §3.2 (Eq. 2-7). Each model i is a path of positions 0..L_i (0 = the input image,
L_i = the features); a block is a range of positions (start, end) and K consecutive blocks tile 0..L_i. Block
similarity is S(B, B') = C[in(B), in(B')] + C[out(B), out(B')] on the zoo-wide linear-CKA matrix ``C``.
Every block of model i has size <= (1 + eps_i) * |M_i| / K (Eq. 5).

The solver maximises J = Σ_blocks S(block, anchor of its set) by alternating, per restart:

1. **partition step** (anchors fixed): for every model pick the K-partition that maximises Σ_k max_j S(B_k, a_j),
   each block joining its best anchor's set. ``method="dp"`` solves this *exactly* with a dynamic programme over
   (stage, end position), vectorised over all models in numpy; ``method="swap"`` is the paper's KL-style local
   search (Eq. 6-7: move each shared boundary one position forward or backward while that improves J).
2. **anchor step** (k-medoids): each set's anchor becomes the member with the largest summed similarity to the
   set's members (the old anchor is kept on ties).

Anchor blocks are *pinned*: while a block is an anchor its model must keep it as a block (and in its own set).
This makes J non-decreasing over a restart (step 1 can keep the current partition, step 2 can keep the current
anchor), keeps every anchor a block of the partition, and means no set is ever empty, so no re-seeding is needed.
A restart stops when a round no longer raises J by more than 1e-9; then each block sits with its best anchor and
each anchor is its set's medoid. ``MAX_ROUNDS`` (50) caps the rounds; a restart cut there is still consistent
(anchors are blocks, J is exact) but its last anchor change has not been followed by a re-assignment. The best of
``restarts`` restarts is returned, with sets relabelled in order of their mean stage (set 0 = shallowest).

**Distinct sets** (``distinct=True``, DP only): each model's K blocks go to K *different* sets, so every set holds
one block of every model and every block can be picked by the assembly. The partition step is then an exact DP
over (stage, end position, set of sets used) — 2^K masks, K <= ``MAX_DISTINCT_K`` — maximising the same J; the
anchor step is unchanged, so J stays non-decreasing.

Exact: ``min_feasible_eps`` (min-max DP) and ``best_partition_for_anchors`` (for fixed anchors). Heuristic: the
alternation as a whole (a local optimum per restart, like k-means; restarts cover the rest), and the swap search.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import SolverError

MAX_ROUNDS = 50  # partition/anchor rounds per restart; restarts converge in a handful in practice
_GAIN_TOL = 1e-9  # a round, swap or anchor change must raise J by more than this to count
_SIZE_TOL = 1e-9  # relative tolerance on the size cap, so that eps = min_feasible_eps is feasible despite rounding
METHODS = ("dp", "swap")
MAX_DISTINCT_K = 8  # distinct sets: the DP carries one of 2^K masks of used sets per position


@dataclass(frozen=True)
class ModelPositions:
    """One zoo model's stitchable positions 0..L and the size of the work between consecutive positions."""

    name: str
    offset: int  # global row of position 0 in C
    segment_sizes: tuple[float, ...]  # length L; [p-1] = size of the work between positions p-1 and p (>= 0)

    @property
    def length(self) -> int:
        """L: the index of the features position."""
        return len(self.segment_sizes)

    @property
    def total_size(self) -> float:
        """|M_i|: the sum of all segment sizes."""
        return float(sum(self.segment_sizes))

    def rows(self) -> np.ndarray:
        """Global rows of C for positions 0..L."""
        return self.offset + np.arange(self.length + 1)


@dataclass(frozen=True, order=True)
class BlockRef:
    """Block ``stage`` of model ``model``: local positions start < end. Sorts model-major, then by stage."""

    model: int  # index into the models list
    stage: int  # 0-based stage index k
    start: int  # local position
    end: int  # local position


@dataclass
class Partition:
    """The result of ``partition_zoo``: K blocks per model, each in one of K equivalence sets with an anchor."""

    k: int
    eps: float
    boundaries: list[tuple[int, ...]]  # per model, K+1 positions
    sets: list[tuple[int, ...]]  # per model, equivalence-set index of each stage's block
    anchors: list[BlockRef]  # one per set; anchors are blocks of the final partition
    objective: float  # Σ_blocks S(block, anchor of its set)
    restart_objectives: list[float]  # final objective of each restart, in order
    effective_eps: list[float]  # per model: the eps actually used (see size balance)
    method: str  # "dp" or "swap"
    seconds: float
    model_names: list[str] = field(default_factory=list)  # per model, for reports and checking a saved partition
    distinct: bool = False  # each model's blocks in K different sets

    def blocks(self) -> list[BlockRef]:
        """Every block, model-major, in stage order."""
        return [
            BlockRef(i, stage, bounds[stage], bounds[stage + 1])
            for i, bounds in enumerate(self.boundaries)
            for stage in range(self.k)
        ]

    def equivalence_sets(self) -> list[list[BlockRef]]:
        """Per set, its blocks (model-major)."""
        members: list[list[BlockRef]] = [[] for _ in range(self.k)]
        for block in self.blocks():
            members[self.sets[block.model][block.stage]].append(block)
        return members

    def set_of(self, block: BlockRef) -> int:
        """The equivalence set of ``block``; ValueError if it is not a block of this partition."""
        if not 0 <= block.model < len(self.boundaries) or not 0 <= block.stage < self.k:
            raise ValueError(f"{block} is not a block of this partition")
        bounds = self.boundaries[block.model]
        if (bounds[block.stage], bounds[block.stage + 1]) != (block.start, block.end):
            raise ValueError(f"{block} is not a block of this partition (stage {block.stage} is "
                             f"({bounds[block.stage]}, {bounds[block.stage + 1]}))")
        return self.sets[block.model][block.stage]

    def pickable(self) -> list[BlockRef]:
        """The blocks some assembly can use: block (stage k, set s) is pickable when the stages can be matched
        one-to-one to the sets through (stage, set) pairs that have blocks, with k matched to s (the ILP's
        Eqs. 10-11; budgets and forbidden joins not considered). Exhaustive over the K! matchings."""
        present = {(b.stage, self.set_of(b)) for b in self.blocks()}
        usable: set[tuple[int, int]] = set()
        for perm in itertools.permutations(range(self.k)):
            pairs = set(enumerate(perm))
            if pairs <= present:
                usable |= pairs
        return [b for b in self.blocks() if (b.stage, self.set_of(b)) in usable]

    def to_dict(self) -> dict:
        """JSON-ready dict; ``Partition.from_dict`` inverts it."""
        return {
            "k": self.k,
            "eps": self.eps,
            "boundaries": [list(b) for b in self.boundaries],
            "sets": [list(s) for s in self.sets],
            "anchors": [{"model": a.model, "stage": a.stage, "start": a.start, "end": a.end} for a in self.anchors],
            "objective": self.objective,
            "restart_objectives": list(self.restart_objectives),
            "effective_eps": list(self.effective_eps),
            "method": self.method,
            "seconds": self.seconds,
            "model_names": list(self.model_names),
            "distinct": self.distinct,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Partition:
        """Rebuild a partition written by ``to_dict``."""
        return cls(
            k=int(data["k"]),
            eps=float(data["eps"]),
            boundaries=[tuple(int(p) for p in b) for b in data["boundaries"]],
            sets=[tuple(int(j) for j in s) for s in data["sets"]],
            anchors=[BlockRef(int(a["model"]), int(a["stage"]), int(a["start"]), int(a["end"]))
                     for a in data["anchors"]],
            objective=float(data["objective"]),
            restart_objectives=[float(x) for x in data["restart_objectives"]],
            effective_eps=[float(x) for x in data["effective_eps"]],
            method=str(data["method"]),
            seconds=float(data["seconds"]),
            model_names=[str(n) for n in data.get("model_names", [])],
            distinct=bool(data.get("distinct", False)),
        )


# ---------------------------------------------------------------------------------------------------------------
# Small public helpers


def block_similarity(C: np.ndarray, models: Sequence[ModelPositions], a: BlockRef, b: BlockRef) -> float:
    """S(a, b) = C[in(a), in(b)] + C[out(a), out(b)] on global rows; SolverError on a missing (NaN) entry."""
    oa, ob = models[a.model].offset, models[b.model].offset
    value = float(C[oa + a.start, ob + b.start] + C[oa + a.end, ob + b.end])
    if not math.isfinite(value):
        raise SolverError(
            f"similarity matrix has a missing entry between {models[a.model].name} ({a.start}, {a.end}) "
            f"and {models[b.model].name} ({b.start}, {b.end})",
            "recompute the CKA matrix so every position pair is finite",
        )
    return value


def block_size_cap(model: ModelPositions, k: int, eps: float) -> float:
    """The Eq. 5 cap (1 + eps)·|M|/K, with a 1e-9 relative tolerance so that rounding never rejects a block."""
    total = model.total_size
    return (1.0 + eps) * total / k + _SIZE_TOL * total


def min_feasible_eps(model: ModelPositions, k: int) -> float:
    """Smallest eps for which ``model`` has a K-partition within the Eq. 5 cap (exact min-max DP over boundaries)."""
    _check_length(model, k)
    total = model.total_size
    if total <= 0.0:
        return 0.0
    cum = _cumulative_sizes(model)
    sizes = cum[None, :] - cum[:, None]  # [s, e] = size of block (s, e)
    n = model.length + 1
    valid = np.triu(np.ones((n, n), dtype=bool), 1)
    sizes = np.where(valid, sizes, np.inf)
    worst = np.full(n, np.inf)
    worst[0] = 0.0
    for _ in range(k):
        worst = np.min(np.maximum(worst[:, None], sizes), axis=0)
    return max(0.0, float(worst[model.length]) * k / total - 1.0)


def best_partition_for_anchors(
    C: np.ndarray,
    model: ModelPositions,
    model_index: int,
    anchors: Sequence[BlockRef],
    k: int,
    cap: float,
    *,
    models: Sequence[ModelPositions],
    distinct: bool = False,
) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    """Exact best K-partition of one model for fixed anchors: (boundaries, set of each block, objective).

    Blocks have size <= ``cap``; each block joins its best anchor's set (``distinct``: the best assignment of
    the K blocks to K different sets); anchors that belong to this model (``anchor.model == model_index``) must
    stay blocks and stay in their own set. ``models`` gives the anchors' offsets. DP over (stage, end
    position), O(L²·(K + |anchors|)), times 2^K with ``distinct``. SolverError when no partition fits.
    """
    anchored = _single_model_anchored(C, model, model_index, anchors, k, cap, models)
    if distinct:
        _check_distinct(k, len(anchors), "dp")
        boundaries, sets, objectives = _dp_distinct(anchored.set_values(), anchored.zoo.lengths, k)
    else:
        boundaries, objectives = _dp_partitions(anchored.block_values(), anchored.zoo.lengths, k)
        sets = anchored.block_sets(boundaries)
    if not math.isfinite(objectives[0]):
        raise SolverError(
            f"model '{model.name}' has no {k}-block partition with blocks <= {cap:.6g} that keeps its anchor blocks",
            "raise eps or choose anchors that are blocks of one feasible partition",
        )
    return tuple(int(p) for p in boundaries[0]), tuple(int(j) for j in sets[0]), float(objectives[0])


def swap_partition_for_anchors(
    C: np.ndarray,
    model: ModelPositions,
    model_index: int,
    anchors: Sequence[BlockRef],
    k: int,
    cap: float,
    start_boundaries: Sequence[int],
    *,
    models: Sequence[ModelPositions],
) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    """The paper's KL-style search (Eq. 6-7) from ``start_boundaries``: (boundaries, sets, objective).

    Repeatedly, for each pair of consecutive blocks, move their shared boundary one position forward or backward
    when that keeps both sizes <= ``cap`` (and this model's anchors as blocks) and raises the objective; stop
    when no move does. ``start_boundaries`` must be feasible. Never better than ``best_partition_for_anchors``.
    """
    anchored = _single_model_anchored(C, model, model_index, anchors, k, cap, models)
    values = anchored.block_values()
    start = np.asarray(start_boundaries, dtype=np.int64)
    if (
        start.shape != (k + 1,) or start[0] != 0 or start[-1] != model.length or np.any(np.diff(start) <= 0)
        or not np.all(np.isfinite(values[0, start[:-1], start[1:]]))
    ):
        raise SolverError(
            f"start boundaries {tuple(start.tolist())} are not a feasible {k}-partition of '{model.name}' "
            f"(0 = b_0 < ... < b_K = {model.length}, blocks <= {cap:.6g}, this model's anchors kept as blocks)",
            "start from a feasible partition, e.g. the one best_partition_for_anchors returns",
        )
    bounds = _swap_search(values[0], start)
    sets = anchored.block_sets(bounds[None, :])[0]
    objective = float(sum(values[0, bounds[s], bounds[s + 1]] for s in range(k)))
    return tuple(int(p) for p in bounds), tuple(int(j) for j in sets), objective


# ---------------------------------------------------------------------------------------------------------------
# The zoo solver


def partition_zoo(
    C: np.ndarray,
    models: Sequence[ModelPositions],
    *,
    k: int = 4,
    eps: float = 0.2,
    restarts: int = 200,
    seed: int = 0,
    method: str = "dp",
    size_relax: bool = True,
    distinct: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> Partition:
    """Partition every model into ``k`` blocks grouped into ``k`` equivalence sets (DeRy §3.2); best of restarts.

    Restart r draws from its own stream ``np.random.default_rng(seed).spawn(restarts)[r]``, so results are
    reproducible. ``size_relax`` lifts eps per model to ``min_feasible_eps`` where ``eps`` admits no partition
    (recorded in ``effective_eps``); without it that is a SolverError. ``distinct`` puts each model's blocks in
    K different sets (see the module docstring). ``progress(r, objective)`` is called after each restart.
    """
    started = time.perf_counter()
    C = np.asarray(C, dtype=np.float64)
    models = list(models)
    _validate_problem(C, models, k, eps, restarts, method)
    if distinct:
        _check_distinct(k, k, method)
    effective = _effective_eps(models, k, eps, size_relax)
    caps = [block_size_cap(m, k, e) for m, e in zip(models, effective)]
    arrays = _ZooArrays.build(C, models, caps)
    counts = arrays.partition_counts(k)

    best: _State | None = None
    objectives: list[float] = []
    for r, rng in enumerate(np.random.default_rng(seed).spawn(restarts)):
        state, _ = _run_restart(arrays, counts, rng, method, distinct)
        objectives.append(state.objective)
        if best is None or state.objective > best.objective:
            best = state
        if progress is not None:
            progress(r, state.objective)
    assert best is not None
    partition = _to_partition(C, models, best, k, eps, objectives, effective, method, time.perf_counter() - started)
    partition.distinct = distinct
    return partition


# ---------------------------------------------------------------------------------------------------------------
# Internals: plain arrays for all models at once (padded to the longest model)


@dataclass
class _ZooArrays:
    """Padded per-model arrays: rows[i, p] = global row of position p; feasible[i, s, e] = block fits the cap."""

    C: np.ndarray
    offsets: np.ndarray  # (N,)
    lengths: np.ndarray  # (N,)
    rows: np.ndarray  # (N, Lmax+1), padding repeats the last row (masked by ``feasible``)
    feasible: np.ndarray  # (N, Lmax+1, Lmax+1) bool

    @classmethod
    def build(cls, C: np.ndarray, models: Sequence[ModelPositions], caps: Sequence[float]) -> _ZooArrays:
        n_max = max(m.length for m in models) + 1
        rows = np.empty((len(models), n_max), dtype=np.int64)
        feasible = np.zeros((len(models), n_max, n_max), dtype=bool)
        for i, (model, cap) in enumerate(zip(models, caps)):
            n = model.length + 1
            rows[i, :n] = model.rows()
            rows[i, n:] = model.offset + model.length
            cum = _cumulative_sizes(model)
            feasible[i, :n, :n] = np.triu(cum[None, :] - cum[:, None] <= cap, 1)
        return cls(
            C=C,
            offsets=np.array([m.offset for m in models], dtype=np.int64),
            lengths=np.array([m.length for m in models], dtype=np.int64),
            rows=rows,
            feasible=feasible,
        )

    def anchored(self, anchors: np.ndarray) -> _Anchored:
        """This zoo with anchors given as (K, 3) int rows (model, start, end); every anchor is pinned."""
        anchor_rows = np.stack([self.offsets[anchors[:, 0]] + anchors[:, 1],
                                self.offsets[anchors[:, 0]] + anchors[:, 2]], axis=1)
        pins = [(int(m), int(s), int(e), j) for j, (m, s, e) in enumerate(anchors)]
        return _Anchored.build(self, anchor_rows, pins)

    def partition_counts(self, k: int) -> np.ndarray:
        """counts[j, i, p] = number of feasible j-block partitions of positions 0..p of model i (float64)."""
        n_models, n_max = self.rows.shape
        counts = np.zeros((k + 1, n_models, n_max))
        counts[0, :, 0] = 1.0
        fit = self.feasible.astype(np.float64)
        for j in range(1, k + 1):
            counts[j] = np.einsum("is,ise->ie", counts[j - 1], fit)
        return counts


@dataclass
class _Anchored:
    """A zoo with fixed anchors: to_in[i, p, j] = C[row of (i, p), in(a_j)], to_out likewise with out(a_j).

    ``pins`` = (model, start, end, anchor index): that model must keep the anchor as a block, in its own set.
    """

    zoo: _ZooArrays
    to_in: np.ndarray  # (N, Lmax+1, J)
    to_out: np.ndarray  # (N, Lmax+1, J)
    pins: list[tuple[int, int, int, int]]

    @classmethod
    def build(cls, zoo: _ZooArrays, anchor_rows: np.ndarray, pins: list[tuple[int, int, int, int]]) -> _Anchored:
        to_in = zoo.C[zoo.rows[:, :, None], anchor_rows[None, None, :, 0]]
        to_out = zoo.C[zoo.rows[:, :, None], anchor_rows[None, None, :, 1]]
        return cls(zoo, to_in, to_out, pins)

    def block_values(self) -> np.ndarray:
        """values[i, s, e] = S of block (s, e) of model i with its set's anchor; -inf where the block is not allowed.

        A block's set is its best anchor (a pinned anchor block: its own); blocks over the cap, and blocks that
        overlap a pinned anchor block of their model without being it, are not allowed.
        """
        return self.set_values().max(axis=-1)

    def set_values(self) -> np.ndarray:
        """values[i, s, e, j] = S of block (s, e) of model i with anchor j; -inf where the block is not allowed
        (see :meth:`block_values`) and, for a pinned anchor block, for every set but its own."""
        values = self.to_in[:, :, None, :] + self.to_out[:, None, :, :]
        allowed = self.zoo.feasible.copy()
        positions = np.arange(values.shape[1])
        for model, start, end, _ in self.pins:
            overlaps = (positions[:, None] < end) & (positions[None, :] > start)
            overlaps[start, end] = False
            allowed[model] &= ~overlaps
        if not np.all(np.isfinite(values[allowed])):
            raise SolverError("similarity matrix has missing (NaN) entries on rows the partition uses",
                              "recompute the CKA matrix so every position pair is finite")
        values = np.where(allowed[..., None], values, -np.inf)
        for model, start, end, j in self.pins:
            own = values[model, start, end, j]
            values[model, start, end, :] = -np.inf
            values[model, start, end, j] = own
        return values

    def distinct_sets(self, boundaries: np.ndarray) -> np.ndarray:
        """sets[i, k] for the blocks of ``boundaries``: the best assignment of each model's blocks to different sets
        (pinned anchor blocks their own)."""
        values = self.set_values()
        models = np.arange(len(boundaries))[:, None]
        starts, ends = boundaries[:, :-1], boundaries[:, 1:]
        only = np.full_like(values, -np.inf)
        only[models, starts, ends, :] = values[models, starts, ends, :]
        found, sets, _ = _dp_distinct(only, self.zoo.lengths, boundaries.shape[1] - 1)
        assert np.array_equal(found, boundaries), "the given blocks admit no distinct assignment"
        return sets

    def block_sets(self, boundaries: np.ndarray) -> np.ndarray:
        """sets[i, k] for the blocks of ``boundaries`` (N, K+1): best anchor, pinned anchor blocks their own."""
        models = np.arange(len(boundaries))[:, None]
        per_anchor = self.to_in[models, boundaries[:, :-1], :] + self.to_out[models, boundaries[:, 1:], :]
        sets = per_anchor.argmax(axis=-1)
        for model, start, end, j in self.pins:
            sets[model, (boundaries[model, :-1] == start) & (boundaries[model, 1:] == end)] = j
        return sets


def _single_model_anchored(
    C: np.ndarray,
    model: ModelPositions,
    model_index: int,
    anchors: Sequence[BlockRef],
    k: int,
    cap: float,
    models: Sequence[ModelPositions],
) -> _Anchored:
    """One model with its anchors (global rows from ``models``; the anchors that are its own blocks pinned)."""
    _check_length(model, k)
    if not anchors:
        raise SolverError("no anchors given", "pass one anchor block per equivalence set")
    cum = _cumulative_sizes(model)
    zoo = _ZooArrays(
        C=np.asarray(C, dtype=np.float64),
        offsets=np.array([model.offset]),
        lengths=np.array([model.length]),
        rows=model.rows()[None, :],
        feasible=np.triu(cum[None, :] - cum[:, None] <= cap, 1)[None],
    )
    anchor_rows = np.array([[models[a.model].offset + a.start, models[a.model].offset + a.end] for a in anchors],
                           dtype=np.int64)
    pins = []
    for j, a in enumerate(anchors):
        if a.model == model_index:
            if not 0 <= a.start < a.end <= model.length:
                raise SolverError(f"anchor {a} is outside model '{model.name}' (positions 0..{model.length})",
                                  "pass anchors that are blocks of their models")
            pins.append((0, a.start, a.end, j))
    return _Anchored.build(zoo, anchor_rows, pins)


def _dp_partitions(values: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact max-sum K-partition of every model: (boundaries (N, K+1), objective (N,), -inf where infeasible)."""
    n_models, n_max, _ = values.shape
    by_end = np.ascontiguousarray(values.transpose(0, 2, 1))  # [i, e, s]: reduce over the last axis
    best = np.full((n_models, n_max), -np.inf)
    best[:, 0] = 0.0
    back = np.empty((k, n_models, n_max), dtype=np.int64)
    for stage in range(k):
        candidates = best[:, None, :] + by_end  # (N, end, start)
        back[stage] = candidates.argmax(axis=2)
        best = candidates.max(axis=2)
    models = np.arange(n_models)
    boundaries = np.empty((n_models, k + 1), dtype=np.int64)
    boundaries[:, k] = lengths
    for stage in range(k - 1, -1, -1):
        boundaries[:, stage] = back[stage, models, boundaries[:, stage + 1]]
    return boundaries, best[models, lengths]


def _dp_distinct(values: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact max-sum K-partition of every model with its K blocks in K different sets, from ``values[i, s, e, j]``
    (K sets): (boundaries (N, K+1), sets (N, K), objective (N,), -inf where infeasible). DP over (end, used-set
    mask); the stage is the mask's population count."""
    n_models, n_max, _, n_sets = values.shape
    by_end = np.ascontiguousarray(values.transpose(0, 2, 1, 3))  # [i, e, s, j]
    best = {0: np.full((n_models, n_max), -np.inf)}
    best[0][:, 0] = 0.0
    back: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # mask -> (start, set, previous mask)
    frontier = [0]
    for _ in range(k):
        reached: dict[int, np.ndarray] = {}
        for mask in frontier:
            for j in (j for j in range(n_sets) if not mask >> j & 1):
                candidates = best[mask][:, None, :] + by_end[..., j]  # (N, end, start)
                start, value = candidates.argmax(axis=2), candidates.max(axis=2)
                new = mask | 1 << j
                if new not in reached:
                    reached[new] = value
                    back[new] = (start, np.full_like(start, j), np.full_like(start, mask))
                    continue
                better = value > reached[new]
                reached[new] = np.where(better, value, reached[new])
                old_start, old_set, old_mask = back[new]
                back[new] = (np.where(better, start, old_start), np.where(better, j, old_set),
                             np.where(better, mask, old_mask))
        best.update(reached)
        frontier = list(reached)
    full = (1 << n_sets) - 1
    models = np.arange(n_models)
    boundaries = np.empty((n_models, k + 1), dtype=np.int64)
    sets = np.empty((n_models, k), dtype=np.int64)
    boundaries[:, k] = lengths
    masks = np.full(n_models, full)
    for stage in range(k - 1, -1, -1):
        end = boundaries[:, stage + 1]
        for i in models:
            start, chosen, previous = (part[i, end[i]] for part in back[int(masks[i])])
            boundaries[i, stage], sets[i, stage], masks[i] = start, chosen, previous
    return boundaries, sets, best[full][models, lengths]


def _swap_search(values: np.ndarray, start: np.ndarray) -> np.ndarray:
    """KL-style moves of shared boundaries by ±1 (Eq. 6-7) until none raises the sum of block values."""
    bounds = start.copy()
    k = len(bounds) - 1
    improved = True
    while improved:
        improved = False
        for s in range(1, k):
            left, here, right = bounds[s - 1], bounds[s], bounds[s + 1]
            best_value = values[left, here] + values[here, right]
            best_pos = here
            for moved in (here + 1, here - 1):  # forward (a layer joins block s-1), backward
                if left < moved < right:
                    value = values[left, moved] + values[moved, right]
                    if value > best_value + _GAIN_TOL:
                        best_value, best_pos = value, moved
            if best_pos != here:
                bounds[s] = best_pos
                improved = True
    return bounds


# ---------------------------------------------------------------------------------------------------------------
# Internals: one restart


@dataclass
class _State:
    """boundaries (N, K+1), sets (N, K), anchors (K, 3) = (model, start, end), objective."""

    boundaries: np.ndarray
    sets: np.ndarray
    anchors: np.ndarray
    objective: float


def _run_restart(
    arrays: _ZooArrays, counts: np.ndarray, rng: np.random.Generator, method: str, distinct: bool = False
) -> tuple[_State, list[float]]:
    """One restart: random feasible start, then partition/anchor rounds. Returns the state and J after each step."""
    k = counts.shape[0] - 1
    boundaries = _sample_partitions(arrays, counts, rng)
    owners = rng.integers(len(arrays.lengths), size=k)  # anchor j starts as stage j of a random model
    anchors = np.stack([owners, boundaries[owners, np.arange(k)], boundaries[owners, np.arange(k) + 1]], axis=1)
    anchored = arrays.anchored(anchors)
    sets = anchored.distinct_sets(boundaries) if distinct else anchored.block_sets(boundaries)
    state = _State(boundaries, sets, anchors, _objective(arrays, boundaries, sets, anchors))
    trace = [state.objective]
    for _ in range(MAX_ROUNDS):
        before = state.objective
        state = _partition_step(arrays, state, method, distinct)
        trace.append(state.objective)
        state = _anchor_step(arrays, state)
        trace.append(state.objective)
        if state.objective <= before + _GAIN_TOL:
            break
    return state, trace


def _sample_partitions(arrays: _ZooArrays, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random feasible K-partition per model (backward sampling over partition counts)."""
    k = counts.shape[0] - 1
    boundaries = np.empty((len(arrays.lengths), k + 1), dtype=np.int64)
    for i, length in enumerate(arrays.lengths):
        boundaries[i, k] = length
        for stage in range(k, 0, -1):
            end = boundaries[i, stage]
            weights = np.cumsum(counts[stage - 1, i] * arrays.feasible[i, :, end])
            boundaries[i, stage - 1] = np.searchsorted(weights, rng.random() * weights[-1], side="right")
    return boundaries


def _partition_step(arrays: _ZooArrays, state: _State, method: str, distinct: bool = False) -> _State:
    """Re-partition every model for the current anchors (exact DP or swap search); blocks join their best anchor
    (``distinct``: the best different set each, by the DP)."""
    anchored = arrays.anchored(state.anchors)
    if distinct:
        boundaries, sets, _ = _dp_distinct(anchored.set_values(), arrays.lengths, state.boundaries.shape[1] - 1)
        return _State(boundaries, sets, state.anchors, _objective(arrays, boundaries, sets, state.anchors))
    values = anchored.block_values()
    if method == "dp":
        boundaries, _ = _dp_partitions(values, arrays.lengths, state.boundaries.shape[1] - 1)
    else:
        boundaries = np.stack([_swap_search(values[i], state.boundaries[i]) for i in range(len(values))])
    sets = anchored.block_sets(boundaries)
    return _State(boundaries, sets, state.anchors, _objective(arrays, boundaries, sets, state.anchors))


def _anchor_step(arrays: _ZooArrays, state: _State) -> _State:
    """k-medoids update: each set's anchor becomes the member with the largest summed S to the set (ties: keep)."""
    k = state.sets.shape[1]
    in_rows, out_rows, blocks = _block_rows(arrays, state.boundaries)
    labels = state.sets.ravel()
    similarity = arrays.C[np.ix_(in_rows, in_rows)] + arrays.C[np.ix_(out_rows, out_rows)]
    membership = (labels[:, None] == np.arange(k)[None, :]).astype(np.float64)
    score = similarity @ membership  # [b, j] = Σ_{c in set j} S(b, c)
    anchors = state.anchors.copy()
    for j in range(k):
        members = np.flatnonzero(labels == j)
        current = _block_index(blocks, state.anchors[j])
        assert labels[current] == j, "a pinned anchor block left its own set"
        candidate = members[np.argmax(score[members, j])]
        if score[candidate, j] > score[current, j] + _GAIN_TOL:
            anchors[j] = blocks[candidate]
    return _State(state.boundaries, state.sets, anchors, _objective(arrays, state.boundaries, state.sets, anchors))


def _block_rows(arrays: _ZooArrays, boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global in/out rows of every block (model-major) and the blocks as (model, start, end) rows."""
    n_models, k1 = boundaries.shape
    model_of = np.repeat(np.arange(n_models), k1 - 1)
    starts, ends = boundaries[:, :-1].ravel(), boundaries[:, 1:].ravel()
    blocks = np.stack([model_of, starts, ends], axis=1)
    return arrays.offsets[model_of] + starts, arrays.offsets[model_of] + ends, blocks


def _block_index(blocks: np.ndarray, block: np.ndarray) -> int:
    hits = np.flatnonzero(np.all(blocks == block[None, :], axis=1))
    assert len(hits) == 1, "an anchor is not a block of the partition"
    return int(hits[0])


def _objective(arrays: _ZooArrays, boundaries: np.ndarray, sets: np.ndarray, anchors: np.ndarray) -> float:
    """J = Σ_blocks S(block, anchor of its set), summed in model-major block order."""
    in_rows, out_rows, _ = _block_rows(arrays, boundaries)
    anchor_of = anchors[sets.ravel()]
    anchor_in = arrays.offsets[anchor_of[:, 0]] + anchor_of[:, 1]
    anchor_out = arrays.offsets[anchor_of[:, 0]] + anchor_of[:, 2]
    return float(np.sum(arrays.C[in_rows, anchor_in] + arrays.C[out_rows, anchor_out]))


def _to_partition(
    C: np.ndarray,
    models: Sequence[ModelPositions],
    state: _State,
    k: int,
    eps: float,
    objectives: list[float],
    effective: list[float],
    method: str,
    seconds: float,
) -> Partition:
    """The best state as a Partition: sets relabelled by mean stage, objective recomputed from ``C``."""
    stages = np.broadcast_to(np.arange(k), state.sets.shape)
    anchor_stage = [int(np.flatnonzero(state.boundaries[m] == s)[0]) for m, s, _ in state.anchors]
    mean_stage = [float(stages[state.sets == j].mean()) for j in range(k)]
    order = sorted(range(k), key=lambda j: (mean_stage[j], anchor_stage[j], int(state.anchors[j, 0])))
    relabel = np.empty(k, dtype=np.int64)
    relabel[order] = np.arange(k)
    sets = relabel[state.sets]
    anchors = [BlockRef(int(state.anchors[j, 0]), anchor_stage[j], int(state.anchors[j, 1]), int(state.anchors[j, 2]))
               for j in order]
    partition = Partition(
        k=k,
        eps=eps,
        boundaries=[tuple(int(p) for p in b) for b in state.boundaries],
        sets=[tuple(int(j) for j in s) for s in sets],
        anchors=anchors,
        objective=0.0,
        restart_objectives=objectives,
        effective_eps=effective,
        method=method,
        seconds=0.0,
        model_names=[m.name for m in models],
    )
    partition.objective = sum(block_similarity(C, models, b, anchors[partition.set_of(b)]) for b in partition.blocks())
    partition.seconds = seconds
    return partition


# ---------------------------------------------------------------------------------------------------------------
# Internals: validation


def _cumulative_sizes(model: ModelPositions) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(model.segment_sizes, dtype=np.float64))])


def _check_length(model: ModelPositions, k: int) -> None:
    if model.length < k:
        raise SolverError(
            f"model '{model.name}' has L={model.length} stitchable positions, fewer than k={k} blocks",
            f"use k <= {model.length} or drop '{model.name}' from the zoo",
        )


def _validate_problem(
    C: np.ndarray, models: Sequence[ModelPositions], k: int, eps: float, restarts: int, method: str
) -> None:
    """SolverError naming cause and fix for any malformed input to ``partition_zoo``."""
    if method not in METHODS:
        raise SolverError(f"unknown partition method '{method}'", "use method='dp' (exact) or 'swap' (paper's KL)")
    if k < 1:
        raise SolverError(f"k={k} blocks per model", "use k >= 1 (the paper uses 4)")
    if eps < 0:
        raise SolverError(f"eps={eps} is negative", "use eps >= 0 (the paper uses 0.2)")
    if restarts < 1:
        raise SolverError(f"restarts={restarts}", "use restarts >= 1 (the paper uses 200)")
    if not models:
        raise SolverError("the zoo has no models", "pass at least one ModelPositions")
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise SolverError(f"similarity matrix has shape {C.shape}, not P×P", "pass the square zoo-wide CKA matrix")
    _check_length(min(models, key=lambda m: m.length), k)  # the fix names the zoo's shortest model
    rows = []
    for model in models:
        if any(not (size >= 0) for size in model.segment_sizes):
            raise SolverError(f"model '{model.name}' has a negative or NaN segment size",
                              "pass segment sizes >= 0 (params or MACs)")
        if model.offset < 0 or model.offset + model.length >= C.shape[0]:
            raise SolverError(
                f"model '{model.name}' needs rows {model.offset}..{model.offset + model.length} of C, "
                f"which has {C.shape[0]} rows",
                "build C and the offsets from the same list of models",
            )
        rows.append(model.rows())
    used = np.unique(np.concatenate(rows))
    sub = C[np.ix_(used, used)]
    if not np.all(np.isfinite(sub)):
        raise SolverError("similarity matrix has missing (NaN/inf) entries on the zoo's rows",
                          "recompute the CKA matrix so every position pair is finite")
    if not np.allclose(sub, sub.T, rtol=0.0, atol=1e-8):
        raise SolverError("similarity matrix is not symmetric", "pass C symmetrised, e.g. (C + C.T) / 2")


def _check_distinct(k: int, n_sets: int, method: str) -> None:
    """SolverError unless distinct sets can be solved: the DP method, K sets for K blocks, K <= MAX_DISTINCT_K."""
    if method != "dp":
        raise SolverError("distinct equivalence sets need the exact DP", "use method='dp' with distinct=True")
    if n_sets != k:
        raise SolverError(f"distinct sets need one anchor per set ({k}), got {n_sets}", f"pass {k} anchors")
    if k > MAX_DISTINCT_K:
        raise SolverError(f"distinct sets with k={k} would need 2^{k} DP states per position",
                          f"use k <= {MAX_DISTINCT_K}, or distinct=False")


def _effective_eps(models: Sequence[ModelPositions], k: int, eps: float, size_relax: bool) -> list[float]:
    """Per model eps: ``eps``, or lifted to the smallest feasible eps (``size_relax``); SolverError otherwise."""
    effective = []
    for model in models:
        needed = min_feasible_eps(model, k)
        if needed > eps + _SIZE_TOL * k:  # the cap's tolerance, expressed in eps
            if not size_relax:
                raise SolverError(
                    f"model '{model.name}' has no {k}-block partition with every block <= (1+eps)·|M|/K at eps={eps}",
                    f"use eps >= {math.ceil(needed * 1e4 - 1e-6) / 1e4:.4f} or size_relax=True",
                )
            effective.append(needed)
        else:
            effective.append(eps)
    return effective
