"""Executors behind the pipeline base's ``Executor`` seam: in-process (``LocalExecutor``) or Ray tasks.

``RayExecutor`` runs each item as a Ray task on a local Ray instance (``address=None``: started with
``num_cpus``) or on the cluster at ``address`` (``ray start --head`` prints it). The mapped function and every
item travel through Ray's object store as sealed payloads (``transport``: cloudpickle, traced graphs with their
annotations, a sha256 checked on arrival); each result comes back sealed and is checked before the pipeline uses
it, in item order, so a pipeline's results do not depend on the executor (tests compare them). Files an item
writes (``map_writing``) are written into a private folder on its worker and come back inside its sealed result:
nothing assumes a shared filesystem. Latency (``at_target``) runs on the driver, or on ``latency_node`` (a node's
IP address) as a task pinned there, never on an arbitrary worker.

Tasks that die with their worker (a killed process, the node's out-of-memory killer) are retried
(``MAX_RETRIES``); a task that raises, or dies every time, ends ``map`` with a one-line ``ZooError`` naming the item
and the cause. Joining a cluster checks, before any work, that its workers run the same zoocompiler and torch
versions as the driver (a remote task reports them): another version could compute other results.
``parse_executor`` turns the pipeline commands' ``--executor`` text (``local``, ``ray``, ``ray=ADDRESS``) into an
executor; an unreachable address fails in one line, checked with a TCP connection first (Ray itself retries for
minutes and then exits the process).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from zoocompiler.core.errors import ZooError

from .base import Executor, LocalExecutor, Progress
from .transport import Sealed, collect_files, place_files, seal, unseal, verify

T = TypeVar("T")
R = TypeVar("R")

RAY_HINT = "install Ray: pip install 'zoocompiler[ray]'"
MAX_RETRIES = 2  # a task whose worker process dies is run again this many times


_UNSEALED: dict[str, Callable] = {}  # per worker process: the mapped functions it has unpacked, by sha256
_KEEP = 4


def _function(sealed: Sealed) -> Callable:
    """The mapped function of ``sealed``, unpacked once per worker process (it may carry a whole zoo) and checked
    on every task: its bytes' sha256 must still be the one it was unpacked under."""
    fn = _UNSEALED.get(sealed.sha256)
    if fn is None:
        fn = unseal(sealed, "the mapped function")
        while len(_UNSEALED) >= _KEEP:
            _UNSEALED.pop(next(iter(_UNSEALED)))
        _UNSEALED[sealed.sha256] = fn
    else:
        verify(sealed, "the mapped function")
    return fn


def _call(fn: Sealed, item: Sealed) -> Sealed:
    """A Ray task: ``fn(item)``, sealed."""
    return seal(_function(fn)(unseal(item, "the item")))


def _call_writing(fn: Sealed, item: Sealed) -> Sealed:
    """A Ray task: ``fn(item, folder)`` with a private folder; the result and the folder's files, sealed."""
    with tempfile.TemporaryDirectory(prefix="zoocompiler-item-") as folder:
        result = _function(fn)(unseal(item, "the item"), Path(folder))
        return seal((result, collect_files(Path(folder))))


def _call_plain(fn: Sealed, *args: Any, **kwargs: Any) -> Sealed:
    return seal(unseal(fn, "the function")(*args, **kwargs))


def _label(item: Any, index: int, count: int) -> str:
    """How an error names an item: its value when short (a rate, a class, a model name), else its position."""
    head = item[0] if isinstance(item, tuple) and item else item
    if isinstance(head, (str, int, float)) and len(repr(head)) <= 60:
        return f"item {index + 1} of {count} ({head!r})"
    return f"item {index + 1} of {count}"


def _versions() -> dict[str, str]:
    import torch

    import zoocompiler

    return {"zoocompiler": zoocompiler.__version__, "torch": torch.__version__}


class RayExecutor:
    """``map``/``map_writing`` as Ray tasks (one per item, results in item order); connects on first use."""

    remote = True

    def __init__(self, address: str | None = None, num_cpus: int | None = None, latency_node: str | None = None,
                 progress: Progress | None = None):
        self.address = address
        self.num_cpus = num_cpus
        self.latency_node = latency_node
        self.progress = progress

    def connect(self):
        """Start or join Ray now (idempotent): a bad address, version or ``latency_node`` fails before any work."""
        try:
            import ray
        except ImportError as err:
            raise ZooError("the Ray executor needs Ray, which is not installed", RAY_HINT) from err
        if self.address:
            _check_reachable(self.address)
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError, SystemExit) as err:  # Ray may sys.exit on failure
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise ZooError(f"cannot connect to {where} ({str(err).splitlines()[0][:200]})",
                               "check the address that `ray start --head` printed, or use --executor ray "
                               "for a local instance") from err
            if self.address:
                self._check_versions(ray)
        if self.latency_node:
            self._node_id(ray)
        return ray

    @staticmethod
    def _check_versions(ray) -> None:
        mine = _versions()
        theirs = ray.get(ray.remote(_versions).remote())
        if theirs != mine:
            raise ZooError(
                f"the Ray cluster's workers run {theirs}, this driver {mine}",
                "install the same zoocompiler and torch versions on every node",
            )

    def _node_id(self, ray) -> str:
        alive = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        if self.latency_node not in alive:
            raise ZooError(f"--latency-node {self.latency_node} is not a live node of the Ray cluster "
                           f"(nodes: {', '.join(sorted(alive)) or 'none'})",
                           "pass the IP address of the node whose hardware is the target, or leave it out "
                           "to measure on this machine")
        return alive[self.latency_node]

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return self._run(_call, fn, list(items))

    def map_writing(self, fn: Callable[[T, Path], R], items: Iterable[T], folder: Path) -> list[R]:
        out = []
        for result, files in self._run(_call_writing, fn, list(items)):
            place_files(files, Path(folder))
            out.append(result)
        return out

    def at_target(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """``fn(*args, **kwargs)`` on the driver, or, with ``latency_node``, as a task pinned to that node."""
        if not self.latency_node:
            return fn(*args, **kwargs)
        ray = self.connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(max_retries=MAX_RETRIES)(_call_plain).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(self._node_id(ray), soft=False))
        return self._collect(ray, [task.remote(seal(fn), *args, **kwargs)], [None])[0]

    def _run(self, body: Callable[..., Sealed], fn: Callable, items: list) -> list:
        ray = self.connect()
        task = ray.remote(max_retries=MAX_RETRIES)(body)
        fn_ref = ray.put(seal(fn))
        refs = [task.remote(fn_ref, seal(item)) for item in items]
        return self._collect(ray, refs, items)

    def _collect(self, ray, refs: list, items: list) -> list:
        """The tasks' results in order, each unsealed (sha256 checked); the first failure is a ``ZooError``."""
        results, pending, done = [None] * len(refs), {ref: i for i, ref in enumerate(refs)}, 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            what = _label(items[index], index, len(items))
            try:
                results[index] = unseal(ray.get(ready[0]), f"the result of {what}")
            except ray.exceptions.RayTaskError as err:
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
                if isinstance(cause, ZooError):
                    raise cause from err
                raise ZooError(f"{what} failed on a Ray worker: {type(cause).__name__}: "
                               f"{str(cause).splitlines()[0][:200] if str(cause) else ''}",
                               "rerun with --executor local to see the error in-process") from err
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as err:
                for ref in pending:
                    ray.cancel(ref, force=True)
                why = "ran out of memory" if isinstance(err, ray.exceptions.OutOfMemoryError) else "died"
                raise ZooError(f"{what}: its Ray worker {why} {MAX_RETRIES + 1} times",
                               "give the workers more memory, or run fewer tasks per node") from err
            done += 1
            if self.progress is not None and len(items) > 1:
                self.progress(f"ray: {done}/{len(items)} items done")
        return results


def _host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` of a Ray address (``ray://`` prefix allowed); anything else is a ``ZooError``."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ZooError(f"bad Ray address {address!r}", "write --executor ray=HOST:PORT (`ray start --head` prints it)")
    return host, int(port)


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A TCP connection to ``HOST:PORT`` (``ray://`` prefix allowed; ``auto`` is left to Ray): Ray itself retries an
    unreachable address for minutes and then exits the process."""
    import socket

    if address == "auto":
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise ZooError(f"cannot reach the Ray cluster at {address} ({err.strerror or err})",
                       "check the address that `ray start --head` printed and that its port is open") from err


def parse_executor(text: str | None, latency_node: str | None = None, progress: Progress | None = None) -> Executor:
    """``local`` (or None) → ``LocalExecutor``; ``ray`` → a local Ray instance; ``ray=ADDRESS`` → that cluster.
    ``latency_node`` (an IP address of a cluster node) needs a Ray executor."""
    if text in (None, "", "local"):
        if latency_node:
            raise ZooError("--latency-node needs --executor ray=ADDRESS",
                           "leave --latency-node out to measure latency on this machine")
        return LocalExecutor()
    if text == "ray":
        return RayExecutor(latency_node=latency_node, progress=progress)
    if text.startswith("ray="):
        address = text[len("ray="):].strip()
        if not address:
            raise ZooError("--executor ray= needs an address", "write --executor ray=HOST:PORT, or --executor ray")
        if address != "auto":
            _host_port(address)
        return RayExecutor(address=address, latency_node=latency_node, progress=progress)
    raise ZooError(f"unknown --executor {text!r}", "use local, ray (a local Ray instance) or ray=HOST:PORT")
