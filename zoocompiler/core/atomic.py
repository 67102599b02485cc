"""Atomic file writes: a file either appears complete at its final path or not at all.

Every writer goes to a fresh temporary name in the destination's directory (same file
system, so the final ``os.replace`` is atomic) and removes it if anything fails. An
existing file at the destination is left untouched unless the write succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ZooError


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a not-yet-existing temp path next to ``path``; on success move it onto ``path``.

    The caller writes the temp path (with any writer: ``torch.save``, ``onnx.save``, ...).
    Missing parent directories are created. If the body raises, the temp file is removed and
    ``path`` is unchanged; if the body returns without creating the temp file,
    ``FileNotFoundError`` is raised.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed and fsynced before the rename); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:  # "x": a fresh file created with the process umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> Path:
    """Serialise ``obj`` as JSON (newline-terminated) and write it to ``path`` atomically; returns the path.

    Serialisation happens before any file is touched, so an unserialisable object leaves nothing behind.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
    return write_text_atomic(path, text)


def check_out_dir(out: Path, force: bool) -> None:
    """``out`` may be created: it does not exist, or ``force`` allows replacing the directory there."""
    if out.exists() and not out.is_dir():
        raise ZooError(f"--out {out} exists and is not a directory", "pass a directory path for --out")
    if out.exists() and not force:
        raise ZooError(f"output directory {out} already exists", "pass --force to replace it, or another --out")


@contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temp directory next to ``out``; on success it becomes ``out`` (replacing it with ``force``).

    On failure the temp directory is removed and ``out`` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    staging, old = out.with_name(f".{out.name}.{tag}.tmp"), out.with_name(f".{out.name}.{tag}.old")
    staging.mkdir()
    try:
        yield staging
        check_out_dir(out, force)  # it may have appeared while we worked
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
