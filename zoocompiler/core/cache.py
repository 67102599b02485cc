"""The on-disk cache: its root folder, content digests, and a folder of entries addressed by digest.

Every cache the tool keeps (demo-zoo weights, similarity matrices, block latencies) lives under
:func:`cache_dir` and is addressed by a digest of what produced it (weights, data, options, library
versions), so a stale entry is never found under a current key. Entries are data only (npz without
pickle, JSON, safetensors); writes are atomic; a reader that finds an unreadable or mismatching entry
recomputes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from .atomic import write_json_atomic
from .errors import CheckpointError, ZooError
from .schema import NON_NEGATIVE, MapOf, load_json

_LOG = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The cache root: ``$ZOOCOMPILER_CACHE``, else ``$XDG_CACHE_HOME/zoocompiler`` or ``~/.cache/zoocompiler``."""
    root = os.environ.get("ZOOCOMPILER_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zoocompiler"


def digest(*parts: str | bytes) -> str:
    """sha256 hex digest of ``parts`` (strings are UTF-8 encoded; a single part hashes as itself)."""
    h = hashlib.sha256()
    for i, part in enumerate(parts):
        if i:
            h.update(b"\0")
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()


def weights_hash(model: nn.Module) -> str:
    """sha256 over the state dict: names, dtypes, shapes and raw bytes of every tensor, in sorted name order."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


class DiskCache:
    """A folder of cache entries, each a file named by (a prefix of) its key's digest.

    ``path(key, suffix)`` is where an entry lives (its writer stores it with ``core.atomic``).
    ``read_map``/``write_map`` keep small ``key → number`` tables in one JSON file of the folder.
    """

    def __init__(self, folder: str | Path, prefix: str = ""):
        self.folder = Path(folder)
        self.prefix = prefix

    def path(self, key: str, suffix: str) -> Path:
        return self.folder / f"{self.prefix}{key[:16]}{suffix}"

    def read_map(self, name: str, what: str = "cache table") -> dict[str, float]:
        """The ``key → number`` table in ``name`` (empty when missing). A file that cannot be read, is not
        JSON, or holds anything but finite numbers >= 0 (latencies, sizes) is logged as ``what``, naming the
        file and the bad field, and ignored: its entries are computed again."""
        path = self.folder / name
        if not path.exists():
            return {}
        try:
            data = load_json(path, MapOf(NON_NEGATIVE), what=what)
        except ZooError as err:
            _LOG.warning("%s; measuring again", err)
            return {}
        return {str(k): float(v) for k, v in data.items()}

    def write_map(self, name: str, table: dict[str, Any]) -> None:
        """Store the table; a cache that cannot be written is logged and skipped (the run goes on)."""
        try:
            write_json_atomic(self.folder / name, table)
        except OSError as err:
            _LOG.warning("cannot write the cache table %s (%s); continuing without it", self.folder / name, err)


def read_verified(path: Path, sha256: str, what: str, index: str, fix: str) -> bytes:
    """The bytes of ``path`` when their sha256 is ``sha256``; else ``CheckpointError``: ``<what> <path> is missing
    or unreadable`` / ``… does not match its sha256 in <index> (corrupted or edited)``, with ``fix``."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        raise CheckpointError(f"{what} {path} is missing or unreadable", fix) from None
    if digest(data) != sha256:
        raise CheckpointError(f"{what} {path} does not match its sha256 in {index} (corrupted or edited)", fix)
    return data
