"""Measured ONNX Runtime latency of every partition block on this machine, cached on disk.

Each block is exported (ONNX, batch 1) and timed with ``exports.latency.measure_latency`` (median
of ``runs`` after warm-up, 1 thread). Results are cached in ``<cache>/latency/blocks.json`` keyed
by the model's weights hash, the block's cut range, the input shape, onnxruntime's version, the
thread count and the number of runs. Stitch layers and heads are too many to time one by one; their
latency is estimated by a least-squares line ``a + b·MACs`` fitted to the measured blocks (the
chosen assembly is measured whole afterwards, so the estimate is checked, not trusted).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from zoocompiler.core.cache import DiskCache, cache_dir, digest, weights_hash
from zoocompiler.passes.rewrite.compose import block_module, chosen
from zoocompiler.solvers.partition import Partition

from .members import ZooMember

log = logging.getLogger(__name__)


def latency_cache_file() -> Path:
    return cache_dir() / "latency" / "blocks.json"


def _key(member: ZooMember, start: int, end: int, runs: int, threads: int) -> str:
    import onnxruntime

    p = member.positions
    text = f"{weights_hash(member.module)}|{p[start].node}|{p[end].node}|{member.input_shape}|"
    text += f"{onnxruntime.__version__}|{threads}|{runs}"
    return digest(text)


def measure_block(member: ZooMember, start: int, end: int, runs: int, threads: int) -> float:
    """Median batch-1 latency (ms) of one block in ONNX Runtime."""
    from zoocompiler.exports.latency import measure_latency
    from zoocompiler.exports.onnx_export import export_onnx

    module = block_module(member, start, end)
    x = torch.randn(2, *member.positions[start].tensor.shape[1:])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block.onnx"
        export_onnx(module, x, path)
        shape = (1, *member.positions[start].tensor.shape[1:])
        return measure_latency(path, shape, runs=runs, threads=threads).median_ms


def block_latencies(
    members: Sequence[ZooMember],
    partition: Partition,
    *,
    runs: int = 30,
    threads: int = 1,
    cache_file: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Latency (ms) of every block of ``partition``, keyed like ``ChosenBlock.key``."""
    cache_file = cache_file or latency_cache_file()
    store = DiskCache(cache_file.parent)
    cache = store.read_map(cache_file.name, what="latency cache")
    out: dict[str, float] = {}
    dirty = False
    for ref in partition.blocks():
        m, name = members[ref.model], chosen(members, ref).key
        key = _key(m, ref.start, ref.end, runs, threads)
        if key not in cache:
            if progress is not None:
                progress(name)
            cache[key] = measure_block(m, ref.start, ref.end, runs, threads)
            dirty = True
        out[name] = cache[key]
    if dirty:
        store.write_map(cache_file.name, cache)
    return out


def fit_join_latency(
    latency: dict[str, float], members: Sequence[ZooMember], partition: Partition
) -> Callable[[float], float]:
    """``macs → ms`` line fitted to the measured blocks (non-negative intercept and slope)."""
    xs, ys = [], []
    for ref in partition.blocks():
        m = members[ref.model]
        xs.append(m.macs_between(ref.start, ref.end))
        ys.append(latency[chosen(members, ref).key])
    a = np.stack([np.ones(len(xs)), np.asarray(xs, dtype=np.float64)], axis=1)
    intercept, slope = np.linalg.lstsq(a, np.asarray(ys), rcond=None)[0]
    intercept, slope = max(float(intercept), 0.0), max(float(slope), 0.0)
    return lambda macs: intercept + slope * float(macs)
