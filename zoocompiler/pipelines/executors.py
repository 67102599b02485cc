"""Executors behind the pipeline base's ``Executor.map`` seam: in-process (``LocalExecutor``) or Ray tasks.

``RayExecutor`` runs each item as a Ray task on a local Ray instance (``address=None``: started with
``num_cpus``) or on the cluster at ``address`` (``ray start --head`` prints it). The mapped function is put in
Ray's object store once and every task gets it from there with its item; results come back in item order, so
a pipeline's results do not depend on the executor (tests compare them). Tasks that die with their worker are
retried (``max_retries``); a task that raises ends ``map`` with a ``ZooError`` naming the item.

Joining a cluster checks, before any work, that its workers run the same zoocompiler and torch versions as the
driver (a remote task reports them): another version could compute other results. ``parse_executor`` turns
an executor text (``local``, ``ray``, ``ray=ADDRESS``: what the pipeline commands' ``--executor`` option will take,
issue 18) into an executor; an unreachable address fails in one line, checked with a TCP connection first (Ray
itself retries for minutes and then exits the process).

Not yet wired to the commands: a GraphModule pickled to a worker loses its ``meta`` (the analysis annotations),
so stages whose items carry analysed graphs (e.g. assemble's member probes) must re-analyse or ship annotations
first; the zoo similarity (``pipelines.zoo.similarity``) runs on Ray with the same matrix (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from zoocompiler.core.errors import ZooError

from .base import Executor, LocalExecutor

T = TypeVar("T")
R = TypeVar("R")

RAY_HINT = "install Ray: pip install 'zoocompiler[ray]'"
MAX_RETRIES = 2  # a task whose worker process dies is run again this many times


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def _versions() -> dict[str, str]:
    import torch

    import zoocompiler

    return {"zoocompiler": zoocompiler.__version__, "torch": torch.__version__}


class RayExecutor:
    """``map`` as Ray tasks (one per item, results in item order); connects on first use."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address = address
        self.num_cpus = num_cpus

    def connect(self):
        """Start or join Ray now (idempotent): a bad address or version fails before any work."""
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

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        ray = self.connect()
        items = list(items)
        task = ray.remote(max_retries=MAX_RETRIES)(_call)
        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, item) for item in items]
        results = []
        for index, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayTaskError as err:
                cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
                if isinstance(cause, ZooError):
                    raise cause from err
                raise ZooError(f"item {index} of {len(items)} failed on a Ray worker: {type(cause).__name__}: "
                               f"{str(cause).splitlines()[0][:200] if str(cause) else ''}",
                               "rerun with --executor local to see the error in-process") from err
            except ray.exceptions.WorkerCrashedError as err:
                raise ZooError(f"item {index} of {len(items)}: its Ray worker died {MAX_RETRIES + 1} times "
                               "(out of memory?)", "give the workers more memory, or use fewer") from err
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


def parse_executor(text: str | None) -> Executor:
    """``local`` (or None) → ``LocalExecutor``; ``ray`` → a local Ray instance; ``ray=ADDRESS`` → that cluster."""
    if text in (None, "", "local"):
        return LocalExecutor()
    if text == "ray":
        return RayExecutor()
    if text.startswith("ray="):
        address = text[len("ray="):].strip()
        if not address:
            raise ZooError("--executor ray= needs an address", "write --executor ray=HOST:PORT, or --executor ray")
        if address != "auto":
            _host_port(address)
        return RayExecutor(address=address)
    raise ZooError(f"unknown --executor {text!r}", "use local, ray (a local Ray instance) or ray=HOST:PORT")
