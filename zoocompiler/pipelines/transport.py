"""What crosses between the driver and a Ray worker: sealed payloads (cloudpickle + sha256) and written files.

* **Traced graphs keep their annotations.** A ``torch.fx.GraphModule`` pickles by re-tracing its generated code,
  which drops every node's ``meta`` (shapes, the analysis passes' ``zc`` records) and may rename nodes. :func:`seal`
  sends its graph node by node instead (name, op, target, arguments, ``meta``) with its modules, and the receiver
  rebuilds the same graph: same names, same annotations.
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


def _graph_records(gm) -> tuple[list[tuple], dict]:
    """``gm``'s nodes as (name, op, target, args, kwargs, meta) with node arguments as names, and its own meta."""
    import torch.fx as fx

    def names(value):
        return fx.node.map_arg(value, lambda n: _NodeName(n.name))

    records = [(n.name, n.op, n.target, names(n.args), names(n.kwargs), dict(n.meta), n.type) for n in gm.graph.nodes]
    return records, dict(gm.meta)


@dataclass(frozen=True)
class _NodeName:
    name: str


def _rebuild_graph_module(root, records: list[tuple], meta: dict, codegen, tracer_cls, class_name: str):
    import torch.fx as fx
    from torch.utils._pytree import tree_map

    graph = fx.Graph(tracer_cls=tracer_cls)
    graph._codegen = codegen
    made: dict[str, fx.Node] = {}

    def nodes(value):
        return tree_map(lambda v: made[v.name] if isinstance(v, _NodeName) else v, value)

    for name, op, target, args, kwargs, node_meta, type_ in records:
        node = graph.create_node(op, target, nodes(args), nodes(kwargs), name=name, type_expr=type_)
        if node.name != name:
            raise ZooError(f"a traced graph's node {name!r} came back as {node.name!r} on a Ray worker",
                           "run with --executor local; report the model")
        node.meta.update(node_meta)
        made[name] = node
    gm = fx.GraphModule(root, graph, class_name=class_name)
    gm.meta.update(meta)
    return gm


def _pickler_class():
    import torch
    import torch.fx as fx
    import torch.nn as nn
    from ray import cloudpickle

    class GraphPickler(cloudpickle.CloudPickler):
        def reducer_override(self, obj):
            if isinstance(obj, fx.GraphModule):
                root = nn.Module()
                root._modules, root._parameters, root._buffers = obj._modules, obj._parameters, obj._buffers
                for name, value in obj.__dict__.items():  # get_attr targets that are plain tensors or constants
                    if not name.startswith("_") and name not in ("training", "meta", "shape_env"):
                        root.__dict__[name] = value
                records, meta = _graph_records(obj)
                return _rebuild_graph_module, (root, records, meta, obj.graph._codegen, obj.graph._tracer_cls,
                                               type(obj).__name__)
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


def verify(sealed: Sealed, what: str) -> None:
    """Raise a ``ZooError`` naming ``what`` unless ``sealed``'s bytes have its sha256."""
    if hashlib.sha256(sealed.blob).hexdigest() != sealed.sha256:
        raise ZooError(f"{what} failed its sha256 check (corrupted in transfer)",
                       "rerun; if it repeats, check the nodes' memory and network")


def unseal(sealed: Sealed, what: str) -> Any:
    """The object in ``sealed`` after its sha256 is checked (:func:`verify`)."""
    import pickle

    verify(sealed, what)
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
