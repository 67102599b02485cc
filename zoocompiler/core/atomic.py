"""Atomic file writes: a file either appears complete at its final path or not at all.

Every writer goes to a fresh temporary name in the destination's directory (same file
system, so the final ``os.replace`` is atomic) and removes it if anything fails. An
existing file at the destination is left untouched unless the write succeeds.

Temporary names carry the writer's pid (``.NAME.<pid>-<random>.tmp``). A run killed with
SIGKILL cannot clean up, so the next write to the same target removes the temporaries of
writers whose pid is gone (:func:`remove_leftovers`); a live writer's files are never touched.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ZooError

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{12}\.(?P<kind>tmp|old)$")


def _tag() -> str:
    """``<pid>-<random>``: unique, and it says which process a temporary belongs to."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_tag()}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftovers(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries next to ``target`` that a killed run left (their pid is no longer running).

    A leftover ``.old`` is the previous output a killed run had moved aside: it is put back when
    ``target`` is missing, else removed. Returns what was removed or restored.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        match = _LEFTOVER.match(path.name)
        if match is None or match["name"] != target.name or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not target.exists():
            os.replace(path, target)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        found.append(path)
    return found


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
    remove_leftovers(final)
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


def write_state_dict_atomic(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Save tensors as safetensors atomically, with the file mode of every other output (the umask;
    ``safetensors.torch.save_file`` would create it 0600)."""
    from safetensors.torch import save

    return write_bytes_atomic(path, save({k: v.detach().contiguous() for k, v in state.items()}))


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


def check_writable_parent(path: Path, flag: str = "--out") -> None:
    """The nearest existing ancestor of ``path`` is a directory this process can create entries in."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ZooError(f"{flag} {path}: {parent} is a file, not a directory", f"pass a {flag} inside a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZooError(f"{flag} {path}: cannot write to {parent} (permission denied)",
                       f"pass a {flag} in a directory you can write to")


def check_out_dir(out: Path, force: bool) -> None:
    """``out`` may be created: it does not exist, or ``force`` allows replacing the directory there; its
    parent is writable; and it is neither the working directory nor one of its ancestors."""
    if out.exists() and not out.is_dir():
        raise ZooError(f"--out {out} exists and is not a directory", "pass a directory path for --out")
    cwd, resolved = Path.cwd().resolve(), out.resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ZooError(f"--out {out} is the working directory or contains it, which a run would replace",
                       "pass a new directory for --out, e.g. --out out/run1")
    if out.exists() and not force:
        raise ZooError(f"output directory {out} already exists", "pass --force to replace it, or another --out")
    check_writable_parent(out)


def check_keeps(out: str | os.PathLike[str], protected: str | os.PathLike[str], what: str,
                example: str | os.PathLike[str]) -> None:
    """``ZooError`` when replacing ``out`` would delete ``protected`` (``out`` is it or one of its ancestors);
    ``what`` names it ("the fragment store"), ``example`` is an ``--out`` to suggest instead."""
    source, target = Path(protected).resolve(), Path(out).resolve()
    if target == source or target in source.parents:
        raise ZooError(f"--out {out} would replace {what} {protected}", f"pass another --out, e.g. {example}")


def check_out_file(path: Path) -> None:
    """``path`` can become a file: it is not a directory and its parent is writable."""
    if path.is_dir():
        raise ZooError(f"--out {path} is a directory", f"pass a file path, e.g. --out {path / 'model.onnx'}")
    check_writable_parent(path)


@contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temp directory next to ``out``; on success it becomes ``out`` (replacing it with ``force``).

    On failure (an exception, Ctrl-C, or SIGTERM under :func:`zoocompiler.core.signals.stop_signals_raise`)
    the temp directory is removed and ``out`` is left as it was; leftovers of a killed run on the same
    ``out`` are removed first.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tag = _tag()
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
