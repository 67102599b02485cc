"""The data-limited setting of S&P: each source model comes with ``k`` samples per class of its own data."""

from __future__ import annotations

import zlib

import torch

from zoocompiler.core.errors import DataError
from zoocompiler.data import DataSplit


def source_seed(seed: int, source: str) -> int:
    """The draw seed of one source: ``seed`` mixed with a stable hash of its name (so a source's samples do
    not depend on which other sources are sliced with it)."""
    return (seed * 1_000_003 + zlib.crc32(source.encode())) % (2**31)


def draw_samples(split: DataSplit, k: int, seed: int, source: str) -> DataSplit:
    """``k`` samples of every class of ``split`` (a source's own training data), drawn with
    :func:`source_seed`; in class order, then draw order. Raises ``DataError`` when a class has fewer."""
    if not isinstance(k, int) or k < 1:
        raise DataError(f"k must be a positive integer, got {k!r}", "pass --k 5, 10 or 20")
    gen = torch.Generator().manual_seed(source_seed(seed, source))
    wheres = [torch.nonzero(split.y == label)[:, 0] for label in range(split.num_classes)]
    fewest = min(range(split.num_classes), key=lambda label: len(wheres[label]))  # the fix must fit every class
    if len(wheres[fewest]) < k:
        raise DataError(f"source '{source}' has {len(wheres[fewest])} samples of class {split.classes[fewest]}, "
                        f"fewer than k={k}", f"pass --k {len(wheres[fewest])} or less")
    rows = [where[torch.randperm(len(where), generator=gen)[:k]] for where in wheres]
    index = torch.cat(rows)
    return DataSplit(split.x[index].clone(), split.y[index].clone(), split.classes, split.num_classes,
                     f"{split.name}[k={k}]", split.class_names)
