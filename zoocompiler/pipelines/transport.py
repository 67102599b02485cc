"""What crosses between the driver and a Ray worker: sealed payloads (cloudpickle + sha256) and written files.

* **Traced graphs keep their annotations.** A ``torch.fx.GraphModule`` pickles by re-tracing its generated code,
  which drops every node's ``meta`` (shapes, the analysis passes' ``zc`` records). :func:`seal` pickles it with
  its nodes' names and ``meta`` and the receiver re-attaches them, refusing a graph whose nodes came back
  different.
* **Checked before use.** A :class:`Sealed` payload carries the sha256 of its bytes; :func:`unseal` recomputes it
  and raises ``ZooError`` naming the payload on a mismatch, so a result that left a worker is verified before a
  pipeline uses it.
* **No shared filesystem.** A worker writes an item's files into a private temporary folder; :func:`collect_files`
  returns them (relative path → bytes, inside the sealed result) and :func:`place_files` writes them into the
  driver's output folder.

Payloads are in-memory messages between the driver and workers of one run (Ray's object store); nothing here
reads a file back, so the no-code-on-load rule for manifests and stores is untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoocompiler.core.atomic import write_bytes_atomic
from zoocompiler.core.errors import ZooError


@dataclass(frozen=True)
class Sealed:
    """A pickled payload and the sha256 of its bytes."""

    blob: bytes
    sha256: str


def _restore_graph_module(rebuild, args, names: list[str], metas: list[dict]):
    gm = rebuild(*args)
    nodes = list(gm.graph.nodes)
    if [n.name for n in nodes] != names:
        raise ZooError("a traced graph changed its nodes when it was sent to a Ray worker",
                       "run with --executor local; report the model")
    for node, meta in zip(nodes, metas, strict=True):
        node.meta.update(meta)
    return gm


def _pickler_class():
    import torch
    import torch.fx as fx
    from ray import cloudpickle

    class GraphPickler(cloudpickle.CloudPickler):
        def reducer_override(self, obj):
            if isinstance(obj, fx.GraphModule):
                rebuild, args = obj.__reduce__()[:2]
                nodes = list(obj.graph.nodes)
                return _restore_graph_module, (rebuild, args, [n.name for n in nodes], [dict(n.meta) for n in nodes])
            if isinstance(obj, torch.memory_format):  # in tensor_meta; pickles by a name only `torch` resolves
                return getattr, (torch, str(obj).removeprefix("torch."))
            return super().reducer_override(obj)

    return GraphPickler


def seal(obj: Any) -> Sealed:
    """Pickle ``obj`` (closures and traced graphs with their annotations included) with its sha256."""
    import io

    buffer = io.BytesIO()
    _pickler_class()(buffer, protocol=5).dump(obj)
    blob = buffer.getvalue()
    return Sealed(blob, hashlib.sha256(blob).hexdigest())


def unseal(sealed: Sealed, what: str) -> Any:
    """The object in ``sealed`` after its sha256 is checked; a mismatch is a ``ZooError`` naming ``what``."""
    import pickle

    if hashlib.sha256(sealed.blob).hexdigest() != sealed.sha256:
        raise ZooError(f"{what} failed its sha256 check (corrupted in transfer)",
                       "rerun; if it repeats, check the nodes' memory and network")
    return pickle.loads(sealed.blob)


def collect_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` as relative POSIX path → bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def place_files(files: dict[str, bytes], folder: Path) -> None:
    """Write ``files`` (from :func:`collect_files`) under ``folder``, each atomically; a path that would leave
    ``folder`` is refused."""
    root = Path(folder).resolve()
    for name, data in files.items():
        target = (root / name).resolve()
        if root not in target.parents:
            raise ZooError(f"a worker returned a file outside the output folder: {name!r}", "report this bug")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, data)
