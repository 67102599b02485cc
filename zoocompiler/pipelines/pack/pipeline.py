"""``pack slice`` (sources → fragment store) and ``pack build`` (store + classes → one packed ONNX model).

Slicing a store that exists adds the sources it lacks: the new store is staged next to it with the
existing files hard-linked (untouched) and replaces it only when every new fragment is written, so a
failure or Ctrl-C leaves the old store as it was. Every source is sliced from its own seed (its name),
so a store built in two runs equals one built at once.

ONNX files are written at the config's ``deploy.precision`` (``export_deployable``): a fragment's ONNX is
calibrated (int8) on its source's training split and has no latency table (``--runs`` times the written file);
the packed model is calibrated on the packed classes' training split, evaluated on their test split, and gets
the per-precision latency table. A fragment's weights stay fp32 (``pack build`` rebuilds fragments from them).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from zoocompiler.core.atomic import check_keeps, write_bytes_atomic, write_state_dict_atomic
from zoocompiler.core.cache import digest, weights_hash
from zoocompiler.core.errors import DataError, PassError, ZooError
from zoocompiler.core.modules import count_macs, count_params
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.exports.deploy import check_deployable, export_deployable, export_timed
from zoocompiler.exports.latency import measure_latency
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.rewrite.repairs import SliceLayers, slice_layers

from ..base import Executor, LocalExecutor, Stages, local_only, run_staged, say, write_report
from ..zoo.trainable import example_input
from .config import PackBuildConfig, PackSliceConfig
from .packing import PackedModel, PackSettings, fragment_features, train_pack
from .samples import draw_samples, source_seed
from .slicing import SliceSettings, slice_class
from .store import STORE_FILE, STORE_FORMAT, Store, is_store, read_store, rebuild_fragment, samples_bytes

PACKED_ONNX = "packed.onnx"
Tick = Callable[[str, str], None]  # (what finished, its description): progress bars


def source_names(zoo: str) -> list[str]:
    """The zoo model names ``--zoo`` names: a zoo collection (``pack``: the demo source zoo, three sources;
    ``pack5``: five two-class sources) or comma-separated names."""
    from zoocompiler.zoo import COLLECTIONS, get_entry, list_entries

    if zoo in COLLECTIONS:
        return [e.name for e in list_entries(zoo)]
    names = [n.strip().removeprefix("zoo:") for n in zoo.split(",") if n.strip()]
    if not names:
        raise ZooError(f"--zoo {zoo!r} names no model", "pass --zoo pack or comma-separated zoo model names")
    if len(set(names)) != len(names):
        raise ZooError(f"--zoo {zoo!r} names a model twice", "list each source once")
    for name in names:
        get_entry(name)  # UnknownModelError with close matches
    return names


def _source_graph(name: str, shape: tuple[int, ...], weights: bool = True) -> fx.GraphModule:
    """Zoo model ``name`` traced at ``shape``; ``weights=False``: its architecture only (randomly initialised,
    for rebuilding fragments whose weights come from the store)."""
    from zoocompiler.sources import load_model
    from zoocompiler.zoo import build_model

    model = load_model(f"zoo:{name}") if weights else build_model(name)
    return trace(model.eval(), example_input(shape))


def _check_sources(names: list[str], config: PackSliceConfig, existing: Store | None) -> list[str]:
    """The sources to slice: their data fits, their classes are new, the store's settings match."""
    from zoocompiler.zoo import get_entry

    if existing is not None:
        mismatched = {k: v for k, v in config.settings().items() if existing.settings.get(k) != v}
        if mismatched:
            key = sorted(mismatched)[0]
            raise ZooError(f"store {existing.root} was sliced with {key}={existing.settings.get(key)!r}, "
                           f"not {mismatched[key]!r}", f"pass the store's settings (--{key} "
                           f"{existing.settings.get(key)}) or a new --out")
        names = [n for n in names if n not in existing.sources]
        if not names:
            raise ZooError(f"every source is already in store {existing.root}",
                           "name other --zoo models to add, or slice into a new --out")
    offered = {c: f["source"] for c, f in existing.fragments.items()} if existing is not None else {}
    for name in names:
        entry = get_entry(name)
        for c in entry.classes:
            if c in offered:
                raise ZooError(f"class {c} of {name} is already offered by {offered[c]}",
                               "slice sources with disjoint classes into one store")
            offered[c] = name
    return names


Sliceable = tuple[fx.GraphModule, SliceLayers]  # a source's analysed trace and its S&P layers


def _source_split(name: str, config: PackSliceConfig) -> DataSplit:
    """Source ``name``'s own training split of ``--data`` (its classes), checked against its input shape."""
    from zoocompiler.zoo import get_entry

    entry = get_entry(name)
    split = load_dataset(config.data, "train", classes=list(entry.classes))
    shape = tuple(split.x.shape[1:])
    if tuple(entry.input_shape) != shape:
        raise DataError(f"source {name} takes {tuple(entry.input_shape)} inputs but --data {config.data} has {shape}",
                        "slice with the data the source was trained on (the pack zoo: mnist5k)")
    return split


def _sliceable(name: str, shape: tuple[int, ...], weights: bool = True) -> Sliceable:
    """Source ``name`` traced with its S&P layers; a source without prunable layers is a ``PassError`` naming it."""
    gm = _source_graph(name, shape, weights)
    try:
        return gm, slice_layers(gm)
    except PassError as err:
        raise PassError(f"zoo model {name} cannot be sliced: {err.cause}",
                        "slice zoo models with prunable units (see `zoocompile inspect zoo:NAME`)") from None


# a source's k-shot samples, trace, S&P layers and training split (int8 calibration of its fragments' ONNX)
Prepared = tuple[DataSplit, fx.GraphModule, SliceLayers, DataSplit]


def _preflight(names: list[str], config: PackSliceConfig) -> dict[str, Prepared]:
    """Before anything is sliced or written: every source's data fits and has ``k`` samples of each of its
    classes (``draw_samples``' check), and it has prunable layers. Returns each source's samples, trace and
    training split."""
    prepared = {}
    for name in names:
        split = _source_split(name, config)
        samples = draw_samples(split, config.k, config.seed, name)
        prepared[name] = (samples, *_sliceable(name, tuple(split.x.shape[1:])), split)
    return prepared


def slice_settings(config: PackSliceConfig, name: str) -> SliceSettings:
    """The slicing hyper-parameters ``config`` gives source ``name`` (its own seed)."""
    return SliceSettings(select=config.select, beta=config.resolved_beta, alpha=config.alpha, gamma=config.gamma,
                         pool_steps=config.steps, adapt_steps=config.steps, combine_steps=config.steps,
                         lr=config.lr, seed=source_seed(config.seed, name))


def _link_existing(store: Store, staging: Path) -> None:
    """Hard-link (copy where links fail) every file of ``store`` but its index into ``staging``."""
    for path in store.root.rglob("*"):
        if path.is_file() and path.name != STORE_FILE:
            target = staging / path.relative_to(store.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


def _slice_class(item: tuple[str, int, int], folder: Path, *, config: PackSliceConfig,
                 prepared: dict[str, Prepared], data_sha: dict[str, str], tick: Tick | None,
                 progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Slice class ``cls`` (label ``label``) of source ``name`` (``item``) into ``folder/<name>/class_<cls>.*``;
    its fragment entry (without latency: the driver times the files)."""
    name, label, cls = item
    samples, gm, layers, split = prepared[name]
    options = dataclasses.replace(config.deploy, latency_runs=0)  # the packed model gets the latency table
    shape = tuple(samples.x.shape[1:])
    (folder / name).mkdir(parents=True, exist_ok=True)
    say(progress, f"slicing {name}, class {cls}: {len(layers.layers)} layers")
    done = (lambda stage: tick(stage, f"{name} class {cls}")) if tick else None
    sliced = slice_class(gm, layers, samples.x, samples.y, label, slice_settings(config, name), done)
    module = sliced.fragment.module
    stem = f"{name}/class_{cls}"
    write_state_dict_atomic(folder / f"{stem}.safetensors", module.state_dict())
    deploy = export_deployable(module, samples.x[:2].clone(), folder / f"{stem}.onnx", options,
                               calibration=split.x)  # a fragment returns features: no accuracy to measure
    if tick is not None:
        tick("class", f"{name} class {cls}")
    return {
        "source": name, "class": int(cls), "label": label,
        "weights": f"{stem}.safetensors", "weights_sha256": digest((folder / f"{stem}.safetensors").read_bytes()),
        "onnx": f"{stem}.onnx", "onnx_sha256": digest((folder / f"{stem}.onnx").read_bytes()),
        "units": {layer.point.producer: kept for layer, kept in zip(layers.layers, sliced.kept, strict=True)},
        "kept_units": sum(len(k) for k in sliced.kept), "total_units": sum(sliced.units),
        "features": sliced.fragment.features, "feature_dim": len(sliced.fragment.features),
        "params": count_params(module), "macs": count_macs(module, shape, eval=True),
        "data_sha256": data_sha[name], "slice_seconds": round(sliced.seconds, 3),
        "onnx_max_abs_diff": deploy.export.max_abs_diff, "precision": deploy.precision,
        "onnx_precision": deploy.written(), "repairs_left": sliced.fragment.repairs_left,
        "repair_residual": sliced.repair_residual,
    }


def _source_entry(name: str, prepared: Prepared, data_sha: str) -> dict[str, Any]:
    """Source ``name``'s store entry."""
    from zoocompiler.zoo import get_entry

    samples, gm, layers, _ = prepared
    shape = tuple(samples.x.shape[1:])
    return {"name": name, "spec": f"zoo:{name}", "classes": [int(c) for c in get_entry(name).classes],
            "samples": f"{name}/samples.npz", "samples_sha256": data_sha, "layers": len(layers.layers),
            "repaired_layers": sum(1 for layer in layers.layers if layer.repaired),
            "zeroed": {layer.point.producer: layer.zeroed for layer in layers.layers if not layer.repaired},
            "skipped": layers.skipped, "params": count_params(gm), "macs": count_macs(gm, shape, eval=True)}


def slice_to_store(config: PackSliceConfig, out: Path, *, progress: Callable[[str], None] | None = None,
                   tick: Tick | None = None, executor: Executor | None = None) -> dict[str, Any]:
    """Slice the sources of ``config`` into the store ``out`` (created, or extended when it is a store).
    Returns the report (also ``out/report.json``)."""
    config.check()
    out = Path(out)
    if out.exists() and not is_store(out):
        raise ZooError(f"--out {out} exists and is not a fragment store (no {STORE_FILE})",
                       "pass a new --out, or a store written by `zoocompile pack slice` to add sources to")
    existing = read_store(out) if is_store(out) else None
    if existing is not None:
        existing.check_files()  # a corrupted store is refused before anything is linked into the new one
    names = _check_sources(source_names(config.zoo), config, existing)
    check_deployable(config.deploy)  # a CUDA provider without a GPU fails before any work
    prepared = _preflight(names, config)
    executor = executor or LocalExecutor()
    from zoocompiler.zoo import get_entry

    def body(staging: Path) -> dict[str, Any]:
        stages = Stages(progress)
        doc = existing.doc if existing is not None else {
            "format": STORE_FORMAT, "settings": config.settings(), "input_shape": [], "sources": [], "fragments": []}
        doc = {**doc, "sources": list(doc["sources"]), "fragments": list(doc["fragments"])}
        if existing is not None:
            _link_existing(existing, staging)
        data_sha = {}
        for name in names:  # each source's k-shot samples, written here: every fragment of it was cut with them
            samples = prepared[name][0]
            data = samples_bytes(samples.x, samples.y)
            (staging / name).mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(staging / name / "samples.npz", data)
            data_sha[name] = digest(data)
        items = [(name, label, int(cls)) for name in names for label, cls in enumerate(get_entry(name).classes)]
        with stages("slice", f"slicing {len(names)} source(s), {len(items)} classes, into {out}"):
            cut = functools.partial(_slice_class, config=config, prepared=prepared, data_sha=data_sha,
                                    tick=local_only(executor, tick), progress=local_only(executor, progress))
            fragments = executor.map_writing(cut, items, staging)
        with stages("latency"):  # on this machine or --latency-node, never on a worker
            for fragment in fragments:
                fragment["latency_ms"] = None
                if config.runs:
                    written, shape = (staging / fragment["onnx"]).read_bytes(), prepared[fragment["source"]][0].x.shape
                    fragment["latency_ms"] = executor.at_target(measure_latency, written, (1, *shape[1:]),
                                                                runs=config.runs).median_ms
        results = [(_source_entry(name, prepared[name], data_sha[name]), [f for f in fragments if f["source"] == name])
                   for name in names]
        for source, fragments_of in results:
            doc["sources"].append(source)
            doc["fragments"].extend(fragments_of)
        doc["input_shape"] = list(load_dataset(config.data, "test").x.shape[1:])
        doc["fragments"].sort(key=lambda f: f["class"])
        write_report(staging, doc, STORE_FILE)
        report = {"store": str(out), "added_sources": names, "fragments_added": sum(len(f) for _, f in results),
                  "fragments": len(doc["fragments"]), "precision": config.deploy.precision, "timings": stages.timings,
                  "slice_seconds": {s["name"]: round(sum(f["slice_seconds"] for f in fr), 2) for s, fr in results}}
        write_report(staging, report)
        return report

    return run_staged(config, out, existing is not None, body)


def list_store(path: Path) -> dict[str, Any]:
    """What a store offers: settings, sources and one row per fragment (every file checked by its sha256)."""
    store = read_store(path)
    store.check_files()
    rows = [{k: f[k] for k in ("class", "source", "params", "macs", "feature_dim", "slice_seconds")}
            | {"units": f"{f.get('kept_units', '?')}/{f.get('total_units', '?')}", "data_sha256": f["data_sha256"][:12],
               "precision": f.get("precision", "fp32")}  # stores sliced before --precision: fp32
            for f in store.doc["fragments"]]
    return {"store": str(path), "settings": store.settings,
            "sources": [{k: s[k] for k in ("name", "classes", "params", "macs", "layers")}
                        for s in store.doc["sources"]],
            "fragments": rows}


def check_build_classes(store: Store, classes: list[int]) -> None:
    offered = store.fragments
    missing = [c for c in classes if c not in offered]
    if missing:
        raise ZooError(f"class {missing[0]} is not offered by any source in {store.root}",
                       f"pack classes the store offers: {', '.join(map(str, sorted(offered)))}")


def load_fragments(store: Store, classes: list[int]) -> tuple[list[torch.nn.Module], torch.Tensor, torch.Tensor]:
    """The rebuilt fragments of ``classes`` and their training samples ``(x, y)`` (``y``: index in ``classes``)."""
    graphs: dict[str, Sliceable] = {}
    samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules, xs, ys = [], [], []
    for i, c in enumerate(classes):
        entry = store.fragments[c]
        source = entry["source"]
        if source not in graphs:  # each source is traced and its samples read once per build
            graphs[source] = _sliceable(source, store.input_shape, weights=False)
            samples[source] = store.samples(source)
        modules.append(rebuild_fragment(store, graphs[source], entry))
        x, y = samples[source]
        if store.sources[source]["samples_sha256"] != entry["data_sha256"]:
            raise ZooError(f"fragment of class {c} was sliced from other samples than {source}'s in the store",
                           "re-slice that source")
        mine = x[y == entry["label"]]
        xs.append(mine)
        ys.append(torch.full((len(mine),), i, dtype=torch.long))
    return modules, torch.cat(xs), torch.cat(ys)


def build_pack(store_path: Path, config: PackBuildConfig, out: Path, *, force: bool = False,
               progress: Callable[[str], None] | None = None, executor: Executor | None = None) -> dict[str, Any]:
    """Pack the fragments of ``config.classes`` from the store into ``out`` (``packed.onnx`` + report); latency is
    measured where ``executor.at_target`` runs (default: here)."""
    config.check()
    store = read_store(store_path)
    check_build_classes(store, config.classes)
    check_keeps(out, store_path, "the fragment store", Path(store_path).parent / "packed")
    check_deployable(config.deploy)  # a CUDA provider without a GPU fails before any work
    for c in config.classes:  # missing or edited files: refused before --out is touched
        entry = store.fragments[c]
        store.verified_bytes(entry["weights"], entry["weights_sha256"])
        source_entry = store.sources[entry["source"]]
        store.verified_bytes(source_entry["samples"], source_entry["samples_sha256"])

    def body(staging: Path) -> dict[str, Any]:
        stages = Stages(progress)
        start = time.perf_counter()
        with stages("load", f"loading {len(config.classes)} fragment(s)"):
            fragments, x, y = load_fragments(store, config.classes)
        hashes = [weights_hash(f) for f in fragments]
        with stages("pack", "packing: encoder, decoders and head"):
            features = fragment_features(fragments, x)
            trained = train_pack(features, y, len(config.classes),
                                 PackSettings(delta=config.delta, width=config.width, steps=config.steps,
                                              lr=config.lr, seed=config.seed))
            model = PackedModel(fragments, trained.encoder, trained.head, config.classes).eval()
        pack_seconds = time.perf_counter() - start
        if [weights_hash(f) for f in fragments] != hashes:
            raise ZooError("packing changed a fragment's weights", "report this: fragments must stay frozen")
        test = load_dataset(store.settings["data"], "test", classes=config.classes)
        calibration = load_dataset(store.settings["data"], "train", classes=config.classes).x
        with torch.no_grad():
            accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
        with stages("export", f"exporting and verifying the packed model ({config.deploy.precision})"):
            deploy, timed = export_timed(model, test.x[:2].clone(), staging / PACKED_ONNX, config.deploy,
                                         runs=config.runs, at=(executor or LocalExecutor()).at_target,
                                         calibration=calibration, evaluation=(test.x, test.y), progress=progress)
            latency = timed.median_ms
        entries = [store.fragments[c] for c in config.classes]
        report = {
            "store": str(store_path), "classes": config.classes,
            "fragments": [{"class": e["class"], "source": e["source"], "params": e["params"], "macs": e["macs"],
                           "feature_dim": e["feature_dim"]} for e in entries],
            "sources": sorted({e["source"] for e in entries}),
            "params": count_params(model), "macs": count_macs(model, store.input_shape, eval=True),
            "encoder_width": trained.encoder.out_features, "latency_ms": latency,
            "test_accuracy": accuracy, "test_samples": len(test), "train_samples": len(x),
            "onnx": PACKED_ONNX, "onnx_max_abs_diff": deploy.export.max_abs_diff,  # the fp32 export's parity
            "precision": config.deploy.precision, "onnx_precision": deploy.written(),
            "deploy": deploy.to_dict(PACKED_ONNX),
            "pack_seconds": round(pack_seconds, 3),
            "slice_seconds": round(sum(e["slice_seconds"] for e in entries), 3),
            "final_loss": trained.losses[-1], "settings": vars(config) | {"classes": config.classes},
            "timings": stages.timings,
        }
        write_report(staging, report)
        return report

    return run_staged(config, out, force, body)
