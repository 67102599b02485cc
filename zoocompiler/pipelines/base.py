"""The pipeline base: the small contract every pipeline (assemble, slice, modularize, pack, pool) follows.

* **Config first.** A pipeline's config is a dataclass with ``check()`` (raises ``ZooError``);
  :func:`run_staged` calls it before any work and before the output directory is touched.
* **Named stages.** ``with stages("ilp", "assembly ILP ..."):`` prints the message through the
  pipeline's progress callback and records the stage's wall time as ``timings["ilp_s"]``, which the
  report carries.
* **All-or-nothing output.** :func:`run_staged` gives the body a fresh staging directory next to
  ``out`` and renames it onto ``out`` only when the body returns (``core.atomic.staged_dir``); an
  error, Ctrl-C or SIGTERM (``core.signals.stop_signals_raise``) removes it, and leftovers of a killed
  run on the same ``out`` are removed by the next one.
* **One report writer.** :func:`write_report` writes ``report.json`` through the one JSON sanitiser.
* **An executor seam.** Loops whose items are independent (per model, per candidate, per rate) go
  through ``Executor.map(fn, items)``; items that write files go through ``map_writing(fn, items, folder)``
  (``fn(item, folder)`` writes into the folder it is given, which is ``folder`` itself in-process and a
  worker's private folder elsewhere, whose files the executor places into ``folder``); latency runs through
  ``at_target(fn, *args, **kwargs)``, on the driver or the node the user names, never on an arbitrary worker.
  :class:`LocalExecutor` runs everything in-process in order; ``executors.RayExecutor`` runs the same items
  on Ray. Results must not depend on the executor: ``fn`` gets everything it needs from its item and its
  bound arguments (no progress callbacks: :func:`local_only`), and ``map`` returns results in item order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from zoocompiler.core.atomic import check_out_dir, staged_dir, write_json_atomic
from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.signals import stop_signals_raise

T = TypeVar("T")
R = TypeVar("R")

Progress = Callable[[str], None]


class Executor(Protocol):
    """Runs ``fn`` on every item; returns the results in item order. ``remote``: items run in other processes."""

    remote: bool

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]: ...

    def map_writing(self, fn: Callable[[T, Path], R], items: Iterable[T], folder: Path) -> list[R]: ...

    def at_target(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R: ...


class LocalExecutor:
    """The default executor: in-process, one item after the other, in order."""

    remote = False

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return [fn(item) for item in items]

    def map_writing(self, fn: Callable[[T, Path], R], items: Iterable[T], folder: Path) -> list[R]:
        return [fn(item, Path(folder)) for item in items]

    def at_target(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        return fn(*args, **kwargs)


def local_only(executor: Executor | None, callback: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """``callback`` when ``executor`` runs items in this process, else None (a remote item reports no progress
    of its own: the executor reports items done)."""
    return None if executor is not None and executor.remote else callback


class PipelineConfig(Protocol):
    """What :func:`run_staged` needs of a config: ``check()`` raises ``ZooError`` on any bad option."""

    def check(self) -> None: ...


def say(progress: Progress | None, text: str) -> None:
    """Send one progress message (no-op without a callback)."""
    if progress is not None:
        progress(text)


class Stages:
    """Named stages and their wall times (seconds, keyed ``<name>_s``)."""

    def __init__(self, progress: Progress | None = None):
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, message: str | None = None) -> Iterator[None]:
        if message is not None:
            say(self.progress, message)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"{name}_s"] = self.timings.get(f"{name}_s", 0.0) + time.perf_counter() - start


def write_report(out_dir: Path, report: dict[str, Any], name: str = "report.json") -> Path:
    """Write ``report`` as indented JSON (sanitised by ``core.jsonable``) atomically into ``out_dir``."""
    return write_json_atomic(Path(out_dir) / name, jsonable(report))


def run_staged(config: PipelineConfig, out: Path, force: bool, body: Callable[[Path], R]) -> R:
    """Check ``config``, then run ``body(staging_dir)``; the staging directory becomes ``out`` on success.

    A bad config or an existing ``out`` (without ``force``) fails before any work; a failing body,
    Ctrl-C or SIGTERM (raised as ``core.signals.Terminated``) leaves ``out`` as it was.
    """
    config.check()
    check_out_dir(out, force)
    with stop_signals_raise(), staged_dir(out, force) as staging:
        return body(staging)
