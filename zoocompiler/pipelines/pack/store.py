"""The fragment store: a directory with one entry per (source model, class), read back as data only.

Layout::

    STORE/store.json                          format, slicing settings, sources, fragments
    STORE/<source>/samples.npz                the source's k samples per class (x float32, y int64)
    STORE/<source>/class_<c>.safetensors      fragment weights
    STORE/<source>/class_<c>.onnx             fragment as ONNX (parity-checked when written)

A fragment entry records its source, class, the units each layer keeps, its feature positions, params,
MACs, the sha256 of its weights, ONNX and samples (the data hash) and the slicing time. Reading checks
the format, every field's type and, for the files a command uses, their sha256: a missing or edited
file is a one-line ``CheckpointError``. A fragment is rebuilt from its source's architecture (traced
afresh: the spec of a zoo model, never code named by the file) with its kept units, and its weights
load strictly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from zoocompiler.core.cache import read_verified
from zoocompiler.core.errors import CheckpointError
from zoocompiler.core.schema import NUMBER, ListOf, OneOf, load_json
from zoocompiler.sources import check_state_dict

STORE_FORMAT = "zoocompiler.pack-store/1"
STORE_FILE = "store.json"
SAMPLES_FILE = "samples.npz"
_FIX = "re-create the store with `zoocompile pack slice --out STORE` (or slice that source again into a new store)"

SOURCE_SCHEMA = {"name": str, "spec": str, "classes": ListOf(int, 1), "samples": str, "samples_sha256": str,
                 "layers": int, "params": int, "macs": int}
FRAGMENT_SCHEMA = {"source": str, "class": int, "label": int, "weights": str, "weights_sha256": str, "onnx": str,
                   "onnx_sha256": str, "units": {}, "features": ListOf(int, 1), "feature_dim": int, "params": int,
                   "macs": int, "data_sha256": str, "slice_seconds": NUMBER}
STORE_SCHEMA = {"format": OneOf((STORE_FORMAT,)), "settings": {"data": str, "k": int, "select": str, "beta": NUMBER},
                "input_shape": ListOf(int, 1), "sources": ListOf(SOURCE_SCHEMA), "fragments": ListOf(FRAGMENT_SCHEMA)}


@dataclass
class Store:
    """A read store: its directory and ``store.json`` content."""

    root: Path
    doc: dict[str, Any]

    @property
    def settings(self) -> dict[str, Any]:
        return self.doc["settings"]

    @property
    def sources(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.doc["sources"]}

    @property
    def fragments(self) -> dict[int, dict[str, Any]]:
        """Fragments by class id (a class is offered by one source)."""
        return {f["class"]: f for f in self.doc["fragments"]}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.doc["input_shape"])

    def path(self, relative: str) -> Path:
        """``relative`` inside the store; an absolute path or one leaving the store is refused."""
        path = (self.root / relative).resolve()
        if Path(relative).is_absolute() or self.root.resolve() not in path.parents:
            raise CheckpointError(f"{self.root / STORE_FILE} names a file outside the store: {relative!r}", _FIX)
        return path

    def verified_bytes(self, relative: str, sha256: str) -> bytes:
        """The bytes of a store file, checked against the sha256 ``store.json`` records."""
        return read_verified(self.path(relative), sha256, "store file", STORE_FILE, _FIX)

    def check_files(self) -> None:
        """Every file ``store.json`` names (samples, fragment weights and ONNX) is there with its sha256."""
        for entry in self.doc["sources"]:
            self.verified_bytes(entry["samples"], entry["samples_sha256"])
        for entry in self.doc["fragments"]:
            self.verified_bytes(entry["weights"], entry["weights_sha256"])
            self.verified_bytes(entry["onnx"], entry["onnx_sha256"])

    def samples(self, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The verified ``(x, y)`` samples of ``source`` (``y``: labels in the source's class order)."""
        entry = self.sources[source]
        data = self.verified_bytes(entry["samples"], entry["samples_sha256"])
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return torch.from_numpy(arrays["x"].copy()), torch.from_numpy(arrays["y"].copy())


def is_store(path: Path) -> bool:
    return (Path(path) / STORE_FILE).is_file()


def read_store(path: str | Path) -> Store:
    """Read and check ``path/store.json`` (format and fields; files are checked when used)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"fragment store '{root}' does not exist or is not a directory",
                              "pass a directory written by `zoocompile pack slice --out STORE`")
    doc = load_json(root / STORE_FILE, STORE_SCHEMA, what="fragment store", error=CheckpointError, fix=_FIX)
    names = [s["name"] for s in doc["sources"]]
    classes = [f["class"] for f in doc["fragments"]]
    orphan = next((f for f in doc["fragments"] if f["source"] not in names), None)
    if orphan is not None or len(set(names)) != len(names) or len(set(classes)) != len(classes):
        what = (f"its fragment of class {orphan['class']} names source {orphan['source']!r}, which it lacks"
                if orphan is not None else "it lists a source or a class twice")
        raise CheckpointError(f"fragment store {root / STORE_FILE} is inconsistent: {what}", _FIX)
    return Store(root, doc)


def samples_bytes(x: torch.Tensor, y: torch.Tensor) -> bytes:
    """The ``.npz`` bytes of a source's samples (deterministic: no timestamps)."""
    buf = io.BytesIO()
    np.savez(buf, x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))
    return buf.getvalue()


def rebuild_fragment(store: Store, source: tuple[fx.GraphModule, Any], entry: dict[str, Any]) -> fx.GraphModule:
    """Fragment ``entry`` rebuilt on its source (analysed trace and ``slice_layers``) with its stored, verified
    weights."""
    from safetensors.torch import load as load_safetensors

    from zoocompiler.passes.rewrite.repairs import fragment_structure

    gm, layers = source
    units = entry["units"]
    kept = []
    for layer in layers.layers:
        k = units.get(layer.point.producer)
        if not isinstance(k, list) or not k or not all(isinstance(u, int) and 0 <= u < layer.units for u in k):
            raise CheckpointError(f"fragment {entry['weights']} lists no valid kept units for layer "
                                  f"'{layer.point.producer}' of {entry['source']}", _FIX)
        kept.append(k)
    module = fragment_structure(gm, layers, kept)
    state = load_safetensors(store.verified_bytes(entry["weights"], entry["weights_sha256"]))
    check_state_dict(module, state, label=f"fragment {entry['weights']}")
    module.load_state_dict(state, strict=True)
    return module.eval()
