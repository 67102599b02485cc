"""The zoo-wide similarity matrix: linear CKA between every reassembly position of every zoo model.

Row ``offset_i + p`` of the matrix is model i's position p (``assembly_positions``); every model sees
the same probe images, so all input rows are identical representations. Results are cached on disk as
``similarity-<key[:16]>.npz``, keyed by the models' names, weights and positions, the probe data key,
the pooling mode, biased/unbiased CKA and ``CODE_VERSION``. A cache file that is unreadable or does not
match is logged, recomputed and rewritten (atomically).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from zoocompiler.core.atomic import write_bytes_atomic
from zoocompiler.core.cache import DiskCache, digest, weights_hash
from zoocompiler.core.errors import DataError, InputShapeError, SolverError
from zoocompiler.data import DataSplit
from zoocompiler.passes.analysis.activations import assembly_positions, cut_point_activations, pooled_features
from zoocompiler.passes.analysis.cut_points import CutPoint
from zoocompiler.solvers.cka import cka_from_packed, packed_gram

from ..base import Executor, LocalExecutor, local_only

CODE_VERSION = "zoo-similarity-1"  # bump when activations, pooling or CKA change meaning
_LOG = logging.getLogger(__name__)


@dataclass
class ModelPositionsInfo:
    """One model's rows: ``offset`` is the global row of its position 0; ``positions[p]`` is position p."""

    name: str
    offset: int
    positions: list[CutPoint]

    @property
    def features_position(self) -> int:
        """L, the last position (the features before the classifier)."""
        return len(self.positions) - 1


@dataclass
class ZooSimilarity:
    """Linear CKA between all positions of all models (``matrix`` is P×P float64, symmetric, diagonal 1)."""

    models: list[ModelPositionsInfo]
    matrix: np.ndarray
    options: dict[str, Any]
    key: str

    def model(self, name: str) -> ModelPositionsInfo:
        """The rows of model ``name``; unknown names raise ``SolverError``."""
        for m in self.models:
            if m.name == name:
                return m
        raise SolverError(
            f"model {name!r} is not in the similarity matrix",
            f"use one of: {', '.join(m.name for m in self.models)}, or recompute with that model",
        )

    def index(self, model: str, position: int) -> int:
        """Global row of ``model``'s position ``position``; unknown model/position raise ``SolverError``."""
        m = self.model(model)
        if not isinstance(position, (int, np.integer)) or not 0 <= position < len(m.positions):
            raise SolverError(
                f"model {model!r} has no position {position!r}", f"use a position in 0..{m.features_position}"
            )
        return m.offset + int(position)

    def similarity(self, model_a: str, pos_a: int, model_b: str, pos_b: int) -> float:
        """CKA between two positions; a missing entry raises ``SolverError`` (never 0)."""
        value = float(self.matrix[self.index(model_a, pos_a), self.index(model_b, pos_b)])
        if not np.isfinite(value):
            raise SolverError(
                f"similarity of {model_a}:{pos_a} and {model_b}:{pos_b} is missing", "recompute the similarity matrix"
            )
        return value

    def to_dict(self) -> dict[str, Any]:
        """Small JSON-able summary (no matrix): key, options, and every model's positions."""
        return {
            "key": self.key,
            "size": int(self.matrix.shape[0]),
            "options": dict(self.options),
            "models": [
                {
                    "name": m.name,
                    "offset": m.offset,
                    "positions": [
                        {"position": p, "cut_index": c.index, "node": c.node, "layout": c.tensor.layout}
                        for p, c in enumerate(m.positions)
                    ],
                }
                for m in self.models
            ],
        }


def probe_batch(split: DataSplit, fraction: float = 0.05, *, minimum: int = 128, seed: int = 0) -> torch.Tensor:
    """A seeded, class-proportional sample of ``split.x``: ``max(minimum, round(fraction·N))`` images (≤ N).

    The paper probes with 1/20 of the training set. Each class contributes in proportion to its size
    (members are shuffled with ``RandomState(seed)`` and interleaved by rank/class size); the result keeps
    the split's order. Raises ``DataError`` for an empty split or invalid ``fraction``/``minimum``.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"probe fraction must be in (0, 1], got {fraction}", "pass e.g. fraction=0.05")
    if minimum < 1:
        raise DataError(f"probe minimum must be positive, got {minimum}", "pass e.g. minimum=128")
    total = len(split)
    if total == 0:
        raise DataError(f"dataset {split.name!r} has no samples to probe with", "use a non-empty dataset split")
    count = min(total, max(minimum, round(fraction * total)))
    labels = split.y.numpy()
    rng = np.random.RandomState(seed)
    order, rank = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        order.append(members)
        rank.append((np.arange(len(members)) + 0.5) / len(members))
    index, keys = np.concatenate(order), np.concatenate(rank)
    chosen = index[np.argsort(keys, kind="stable")[:count]]
    return split.x[torch.from_numpy(np.sort(chosen))]


def probe_data_key(probe: torch.Tensor, spec: str) -> str:
    """A ``data_key`` for ``zoo_similarity``: sha256 of the data spec, the probe's shape/dtype and its bytes."""
    t = probe.detach().cpu().contiguous()
    h = hashlib.sha256(f"{spec}|{t.dtype}|{tuple(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def compute_similarity_matrix(
    graphs: Mapping[str, fx.GraphModule],
    positions: Mapping[str, list[CutPoint]],
    probe: torch.Tensor,
    *,
    pool: str = "mean",
    unbiased: bool = False,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    executor: Executor | None = None,
) -> np.ndarray:
    """CKA matrix over the positions of every model, in ``graphs`` order (one forward pass per model).

    Each model is an independent item of ``executor`` (default: in-process, in order) and yields the
    packed Grams of its positions. Activations are pooled batch by batch and each position's pooled
    features are reduced to their Gram right after its model has run, so memory holds one batch of
    activations and one model's features.
    """
    grams_of = functools.partial(
        _model_grams, positions=positions, probe=probe, pool=pool, unbiased=unbiased,
        batch_size=batch_size, progress=local_only(executor, progress),
    )  # fmt: skip
    per_model = (executor or LocalExecutor()).map(grams_of, list(graphs.items()))
    return cka_from_packed([g for grams in per_model for g in grams], unbiased=unbiased)


def _model_grams(
    item: tuple[str, fx.GraphModule],
    *,
    positions: Mapping[str, list[CutPoint]],
    probe: torch.Tensor,
    pool: str,
    unbiased: bool,
    batch_size: int,
    progress: Callable[[str], None] | None,
) -> list[tuple[np.ndarray, bool]]:
    """The packed Gram of every position of one model on the probe."""
    name, gm = item
    if progress is not None:
        progress(name)
    rows = positions[name]
    nodes = [c.node for c in rows]
    pooled: list[list[torch.Tensor]] = [[] for _ in rows]
    for batch in torch.split(probe, batch_size):
        acts = cut_point_activations(gm, batch, nodes, batch_size=batch_size)
        for p, c in enumerate(rows):
            pooled[p].append(pooled_features(acts[c.node], c.tensor, pool))
        del acts
    return [
        packed_gram(torch.cat(chunks).numpy(), unbiased=unbiased, what=f"{name} position {p} ({rows[p].node})")
        for p, chunks in enumerate(pooled)
    ]


def zoo_similarity(
    graphs: Mapping[str, fx.GraphModule],
    probe: torch.Tensor,
    *,
    pool: str = "mean",
    unbiased: bool = False,
    cache_dir: Path | None,
    data_key: str,
    progress: Callable[[str], None] | None = None,
    batch_size: int = 256,
    executor: Executor | None = None,
) -> ZooSimilarity:
    """The zoo's similarity matrix on ``probe`` images, loaded from ``cache_dir`` when cached there.

    ``data_key`` identifies the probe (e.g. sha256 of its bytes + the data spec). ``cache_dir=None``
    disables caching. A probe whose per-sample shape differs from a model's traced input raises
    ``InputShapeError``; ``progress(model_name)`` is called before each model's forward pass.
    """
    if not graphs:
        raise SolverError("no models given", "pass at least one traced model")
    probe = probe.detach().to(torch.float32)
    positions = {name: assembly_positions(gm) for name, gm in graphs.items()}
    for name, rows in positions.items():
        expected, got = tuple(rows[0].tensor.shape[1:]), tuple(probe.shape[1:])
        if expected != got:
            raise InputShapeError(
                f"model {name!r} takes inputs of shape {expected} but the probe data has shape {got}",
                "use data with the model's input shape (load_dataset(..., image_size=...)) or trace it at the data's",
            )
    models, offset = [], 0
    for name, rows in positions.items():
        models.append(ModelPositionsInfo(name, offset, rows))
        offset += len(rows)
    options = {
        "pool": pool,
        "unbiased": bool(unbiased),
        "probe_size": int(probe.shape[0]),
        "data_key": data_key,
        "version": CODE_VERSION,
    }
    rows_json = _positions_json(models)
    key = _cache_key(graphs, rows_json, options)
    path = None if cache_dir is None else DiskCache(cache_dir, prefix="similarity-").path(key, ".npz")
    if path is not None and path.exists():
        matrix = _load_cached(path, key, rows_json, options, offset)
        if matrix is not None:
            return ZooSimilarity(models, matrix, options, key)
    matrix = compute_similarity_matrix(
        graphs, positions, probe, pool=pool, unbiased=unbiased, batch_size=batch_size, progress=progress,
        executor=executor,
    )
    if path is not None:
        try:
            _save_cached(path, key, rows_json, options, matrix)
        except OSError as err:  # a cache that cannot be written is no cache, not a failed run
            _LOG.warning("cannot write the similarity cache %s (%s); continuing without it", path, err)
    return ZooSimilarity(models, matrix, options, key)


# --- cache ---------------------------------------------------------------------------------------------------------


def _positions_json(models: list[ModelPositionsInfo]) -> str:
    """One row per global position: [model, position, cut index, node, layout, per-sample shape]."""
    rows = [
        [m.name, p, c.index, c.node, c.tensor.layout, list(c.tensor.shape[1:])]
        for m in models
        for p, c in enumerate(m.positions)
    ]
    return json.dumps(rows, separators=(",", ":"))


def _cache_key(graphs: Mapping[str, fx.GraphModule], rows_json: str, options: dict[str, Any]) -> str:
    payload = {
        "models": [[name, weights_hash(gm)] for name, gm in graphs.items()],
        "positions": rows_json,
        "data_key": options["data_key"],
        "pool": options["pool"],
        "unbiased": options["unbiased"],
        "version": CODE_VERSION,
    }
    return digest(json.dumps(payload, sort_keys=True))


def _content_hash(matrix: np.ndarray, key: str, rows_json: str, options_json: str) -> str:
    return digest(key, rows_json, options_json, np.ascontiguousarray(matrix, dtype=np.float64).tobytes())


def _save_cached(path: Path, key: str, rows_json: str, options: dict[str, Any], matrix: np.ndarray) -> None:
    options_json = json.dumps(options, sort_keys=True)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        matrix=matrix,
        key=np.array(key),
        positions=np.array(rows_json),
        options=np.array(options_json),
        content_sha256=np.array(_content_hash(matrix, key, rows_json, options_json)),
    )
    write_bytes_atomic(path, buffer.getvalue())


def _load_cached(path: Path, key: str, rows_json: str, options: dict[str, Any], size: int) -> np.ndarray | None:
    """The cached matrix if ``path`` is intact and matches; otherwise log a warning and return None."""
    try:
        with np.load(path, allow_pickle=False) as f:
            matrix = np.array(f["matrix"], dtype=np.float64)
            stored = {name: str(f[name][()]) for name in ("key", "positions", "options", "content_sha256")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        _LOG.warning("similarity cache %s is unreadable (%s); recomputing it", path, err)
        return None
    reason = None
    if stored["key"] != key:
        reason = "its key does not match"
    elif stored["positions"] != rows_json or matrix.shape != (size, size):
        reason = "its positions do not match the models"
    elif stored["options"] != json.dumps(options, sort_keys=True):
        reason = "its options do not match"
    elif stored["content_sha256"] != _content_hash(matrix, stored["key"], stored["positions"], stored["options"]):
        reason = "its content hash does not match"
    elif not np.all(np.isfinite(matrix)):
        reason = "it holds non-finite values"
    if reason is not None:
        _LOG.warning("similarity cache %s is stale or corrupted (%s); recomputing it", path, reason)
        return None
    return matrix
