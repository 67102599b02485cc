"""``zoocompile pack slice | build | list``: Slice-and-Pack (paper 000) on the command line.

``pack slice`` builds a ``PackSliceConfig`` and slices the sources into a fragment store (created, or
extended with the sources it lacks); ``pack build`` builds a ``PackBuildConfig`` and packs the fragments
of a few classes into one ONNX model; ``pack list`` shows what a store offers. Options default to the
configs' field defaults. Every command prints standard JSON with ``--json`` (NaN → null); ``pack slice``
shows progress bars on stderr (none with ``--json``). A store is replaced only when every new fragment is
written, and a bad option, store or source is a one-line error before anything is sliced or written.
``pack slice`` and ``pack build`` write their ONNX files at ``--precision`` (``cli.common.deploy_options``);
``pack build`` renders the packed model's precision and latency tables (``render_deploy``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.text import human

from ..core.classes import parse_classes
from ..pipelines.pack.config import DEFAULT_BETA, SELECTIONS, PackBuildConfig, PackSliceConfig
from .common import (
    check_at_least,
    config_from_args,
    default_of,
    deploy_from_args,
    deploy_options,
    executor_from_args,
    executor_options,
    json_option,
    out_dir_options,
    progress,
    render_deploy,
    table,
    written_files,
)

SLICE_CONFIG, BUILD_CONFIG = PackSliceConfig, PackBuildConfig
_CLASS_MESSAGE = re.compile(r"slicing (?P<source>\S+), class (?P<cls>\d+): (?P<layers>\d+) layers")


# ----------------------------------------------------------------------------- progress bars (pack slice)


class SliceBars:
    """The progress of ``pack slice`` on stderr: one bar over every (source, class) to slice and, per
    class, one over its layers' two steps (stage-1 adaption, then combining). Pipeline messages are
    printed above the bars. ``planned()`` gives the number of classes to slice; it is asked when the
    first class starts (the pipeline has checked every input by then)."""

    def __init__(self, planned: Callable[[], int], file: Any = None):
        self.planned = planned
        self.file = file if file is not None else sys.stderr
        self.overall: Any = None
        self.layers: Any = None

    def _bar(self, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm

        return tqdm(file=self.file, dynamic_ncols=True, **kwargs)

    def message(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"· {text}", file=self.file)
        match = _CLASS_MESSAGE.fullmatch(text)
        if match is None:
            return
        if self.overall is None:
            self.overall = self._bar(total=self.planned(), desc="classes", unit="class", position=0)
        self.overall.set_postfix_str(f"{match['source']} class {match['cls']}", refresh=False)
        if self.layers is not None:
            self.layers.close()
        layers = int(match["layers"])
        self.layers = self._bar(total=2 * layers, desc=f"{match['source']} class {match['cls']} ({layers} layers)",
                                unit="step", leave=False, position=1)

    def tick(self, stage: str, description: str) -> None:
        if stage in ("adapt", "combine") and self.layers is not None:
            self.layers.update(1)
        elif stage == "class":
            if self.layers is not None:
                self.layers.close()
                self.layers = None
            if self.overall is not None:
                self.overall.update(1)

    def close(self) -> None:
        for bar in (self.layers, self.overall):
            if bar is not None:
                bar.close()
        self.layers = self.overall = None


def _planned_classes(zoo: str, out: Path) -> int:
    """How many classes ``pack slice --zoo ZOO --out OUT`` slices: its sources' minus those OUT already has."""
    from zoocompiler.pipelines.pack.pipeline import source_names
    from zoocompiler.pipelines.pack.store import is_store, read_store
    from zoocompiler.zoo import get_entry

    present = set(read_store(out).sources) if is_store(out) else set()
    return sum(len(get_entry(name).classes) for name in source_names(zoo) if name not in present)


# ----------------------------------------------------------------------------- pack slice


def slice_config(args: argparse.Namespace) -> PackSliceConfig:
    """The ``PackSliceConfig`` the command line asks for."""
    check_at_least(args, 0, "seed")  # --runs: deploy_from_args
    return config_from_args(PackSliceConfig, args, deploy=deploy_from_args(args))


def cmd_pack_slice(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.pack.pipeline import list_store, slice_to_store

    config = slice_config(args)
    out = Path(args.out)
    bars = None if args.json else SliceBars(lambda: _planned_classes(config.zoo, out))
    try:
        report = slice_to_store(config, out, progress=bars and bars.message, tick=bars and bars.tick,
                                executor=executor_from_args(args))
    finally:
        if bars is not None:
            bars.close()
    listing = list_store(out)
    added = [row for row in listing["fragments"] if row["source"] in report["added_sources"]]
    return jsonable({**report, "settings": listing["settings"], "added": added,
                     "sources": [s["name"] for s in listing["sources"]]}, finite=True)


# ----------------------------------------------------------------------------- pack build


def build_config(args: argparse.Namespace) -> PackBuildConfig:
    check_at_least(args, 0, "seed")  # --runs: deploy_from_args
    return config_from_args(PackBuildConfig, args, classes=parse_classes(args.classes), deploy=deploy_from_args(args))


def cmd_pack_build(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.pack.pipeline import build_pack

    config = build_config(args)
    out = Path(args.out)
    report = build_pack(Path(args.store), config, out, force=args.force, progress=progress(args),
                        executor=executor_from_args(args))
    return jsonable({"out": str(out), **report, "files": written_files(out)}, finite=True)


# ----------------------------------------------------------------------------- pack list


def cmd_pack_list(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.pack.pipeline import list_store

    return jsonable(list_store(Path(args.store)), finite=True)


# ----------------------------------------------------------------------------- rendering


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())


def _fragment_rows(rows: list[dict[str, Any]], *, data_hash: bool = False) -> tuple[list[str], list[list[Any]]]:
    columns = ["class", "source", "units kept/total", "params", "MACs", "feature dim", "slice s", "ONNX"]
    table_rows = [[r["class"], r["source"], r["units"], human(r["params"]), human(r["macs"]), r["feature_dim"],
                   _seconds(r["slice_seconds"]), r.get("precision", "fp32")]
                  + ([r["data_sha256"]] if data_hash else []) for r in rows]
    return columns + (["data sha256"] if data_hash else []), table_rows


def render_pack_slice(console, data: dict[str, Any]) -> None:
    columns, rows = _fragment_rows(data["added"])
    title = f"pack slice: {data['fragments_added']} fragment(s) added to {data['store']}"
    console.print(table(title, columns, rows, right=columns[2:7]))
    per_source = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in data["slice_seconds"].items())
    summary = [
        ["store", f"{data['store']} ({data['fragments']} fragment(s) of {len(data['sources'])} source(s): "
                  f"{', '.join(data['sources'])})"],
        ["settings", _settings_text(data["settings"])],
        ["slicing time", f"{per_source} (whole run {data['timings'].get('slice_s', 0.0):.1f} s, with export)"],
    ]
    console.print(table("", ["", ""], summary))


def render_pack_list(console, data: dict[str, Any]) -> None:
    columns = ["source", "classes", "params", "MACs", "layers"]
    rows = [[s["name"], ",".join(map(str, s["classes"])), human(s["params"]), human(s["macs"]), s["layers"]]
            for s in data["sources"]]
    console.print(table(f"fragment store {data['store']}: {len(rows)} source(s)", columns, rows, right=columns[2:]))
    columns, rows = _fragment_rows(data["fragments"], data_hash=True)
    console.print(table(f"{len(rows)} fragment(s)", columns, rows, right=columns[2:7]))
    console.print(table("", ["", ""], [["settings", _settings_text(data["settings"])]]))


def render_pack_build(console, data: dict[str, Any]) -> None:
    columns = ["class", "source", "params", "MACs", "feature dim"]
    rows = [[f["class"], f["source"], human(f["params"]), human(f["macs"]), f["feature_dim"]]
            for f in data["fragments"]]
    classes = ",".join(map(str, data["classes"]))
    console.print(table(f"pack build: classes {classes} from {data['store']} → {data['out']}", columns, rows,
                        right=columns[2:]))
    accuracy = "-" if data["test_accuracy"] is None else f"{data['test_accuracy']:.2%}"
    summary = [
        ["sources", ", ".join(data["sources"])],
        ["packed model", f"{human(data['params'])} params, {human(data['macs'])} MACs, encoder width "
                         f"{data['encoder_width']}"],
        ["latency b1", f"{data['latency_ms']:.3f} ms ({data['precision']} ONNX Runtime, median of "
                       f"{data['settings']['runs']} runs)"],
        ["test accuracy", f"{accuracy} on {data['test_samples']} test samples of those classes "
                          f"(trained on {data['train_samples']} samples)"],
        ["time", f"packing {data['pack_seconds']:.1f} s vs slicing those fragments {data['slice_seconds']:.1f} s"],
        ["ONNX", f"{Path(data['out']) / data['onnx']} ({data['precision']}; fp32 export max |ONNX − PyTorch| "
                 f"{data['onnx_max_abs_diff']:.2g})"],
        ["files", ", ".join(data["files"].values())],
    ]
    console.print(table("", ["", ""], summary))
    render_deploy(console, data["deploy"], "packed model")


# ----------------------------------------------------------------------------- parser


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "store", metavar="STORE", help="a fragment store written by `zoocompile pack slice --out STORE`"
    )


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``pack slice``, ``pack build`` and ``pack list`` to the ``zoocompile`` sub-parser set."""
    pack = commands.add_parser(
        "pack",
        help="slice-and-pack: slice zoo models into per-class fragments, pack a few into one model",
        description="Slice-and-Pack (paper 000): slice every class of each source model into a fragment with a "
        "few samples per class (a fragment store), then pack the fragments of any classes into one model "
        "without retraining them.",
    )
    actions = pack.add_subparsers(dest="pack_command", metavar="ACTION", required=True)

    slice_ = actions.add_parser(
        "slice",
        help="slice the source models into one fragment per (source, class) in a fragment store",
        description="Draw --k samples per class of each source's own data, slice every class of every source "
        "(per layer: ability pooling, unit selection, ability adaption with a repair layer; then combining) "
        "and write one fragment per class (weights + verified ONNX at --precision) into the store --out. An "
        "existing store gets the sources it lacks, with the same settings; it is replaced only when every new "
        "fragment is written (existing files are hard-linked, untouched).",
        epilog="examples:\n"
        "  zoocompile pack slice --data mnist5k --k 10 --out store\n"
        "  zoocompile pack slice --zoo vgg_s_0to3 --k 5 --steps 5 --out store\n"
        "  zoocompile pack slice --zoo resnet_s_4to6 --k 5 --steps 5 --out store --json   # add a source",
    )
    slice_.add_argument(
        "--zoo",
        default=default_of(SLICE_CONFIG, "zoo"),
        metavar="SPECS",
        help="the source models: pack (the demo source zoo: vgg_s_0to3, resnet_s_4to6, convnext_t_7to9), pack5 "
        "(five two-class sources) or comma-separated zoo model names with disjoint classes",
    )
    slice_.add_argument(
        "--data", default=default_of(SLICE_CONFIG, "data"), metavar="DATA", help="the sources' own data (train split)"
    )
    slice_.add_argument(
        "--k", type=int, default=default_of(SLICE_CONFIG, "k"), metavar="K", help="samples per class of each source"
    )
    slice_.add_argument(
        "--select",
        default=default_of(SLICE_CONFIG, "select"),
        metavar="|".join(SELECTIONS),
        help="unit selection: threshold keeps units scoring above (1 - beta) of the layer's best; rate keeps the "
        "top beta of each layer's units",
    )
    slice_.add_argument(
        "--beta",
        type=float,
        metavar="B",
        help="selection parameter in (0, 1] (default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BETA.items())
        + ")",
    )
    slice_.add_argument(
        "--alpha",
        type=float,
        default=default_of(SLICE_CONFIG, "alpha"),
        metavar="A",
        help="weight of the l2,1 sparsity term of the ability-pooling loss L^P",
    )
    slice_.add_argument(
        "--gamma",
        type=float,
        default=default_of(SLICE_CONFIG, "gamma"),
        metavar="G",
        help="weight of the feature-distance term of the adaption and combining losses L^A, L^C",
    )
    slice_.add_argument(
        "--steps",
        type=int,
        default=default_of(SLICE_CONFIG, "steps"),
        metavar="N",
        help="full-batch Adam steps per layer for each stage (pooling, adaption, combining)",
    )
    slice_.add_argument("--lr", type=float, default=default_of(SLICE_CONFIG, "lr"), help="Adam learning rate")
    slice_.add_argument(
        "--seed",
        type=int,
        default=default_of(SLICE_CONFIG, "seed"),
        metavar="N",
        help="seed of the samples and of slicing (mixed with each source's name) and of the int8 calibration sample",
    )
    slice_.add_argument(
        "--runs",
        type=int,
        default=default_of(SLICE_CONFIG, "runs"),
        metavar="N",
        help="timed ONNX Runtime runs per fragment at batch 1 (0: not timed)",
    )
    executor_options(slice_)
    deploy_options(slice_, latency=False)  # fragments get no latency table (the packed model does: pack build)
    slice_.add_argument(
        "--out", required=True, metavar="STORE", help="the fragment store: a new directory, or a store to add to"
    )
    json_option(slice_)
    slice_.set_defaults(run=cmd_pack_slice, render=render_pack_slice)

    build = actions.add_parser(
        "build",
        help="pack the fragments of a few classes into one verified ONNX model; params, MACs, latency, accuracy",
        description="Rebuild the fragments of --classes from STORE (frozen), train the encoder, decoders and "
        "head on their features (L^K = CE + delta·reconstruction) with the store's samples, export the packed "
        "model to ONNX at --precision (verified; int8 calibrated on those classes' training split), time it "
        "(with a latency table per precision) and evaluate it on those classes' test samples; write "
        "OUTDIR/packed.onnx and OUTDIR/report.json (all or nothing).",
        epilog="examples:\n"
        "  zoocompile pack build store --classes 1,5,9 --out pack_159\n"
        "  zoocompile pack build store --classes 0,4 --delta 0 --steps 100 --out pack_04 --json\n"
        "  zoocompile pack build store --classes 1,5,9 --precision int8 --out pack_159_int8",
    )
    _store_argument(build)
    build.add_argument(
        "--classes", required=True, metavar="C,...", help="class ids to pack (each offered by a source in STORE)"
    )
    build.add_argument(
        "--delta",
        type=float,
        default=default_of(BUILD_CONFIG, "delta"),
        metavar="D",
        help="weight of the decoders' reconstruction term of the packing loss L^K",
    )
    build.add_argument(
        "--width",
        type=int,
        default=default_of(BUILD_CONFIG, "width"),
        metavar="W",
        help="encoder width (0: 32 per class, at most the concatenated features)",
    )
    build.add_argument(
        "--steps", type=int, default=default_of(BUILD_CONFIG, "steps"), metavar="N", help="full-batch Adam steps"
    )
    build.add_argument("--lr", type=float, default=default_of(BUILD_CONFIG, "lr"), help="Adam learning rate")
    build.add_argument(
        "--seed",
        type=int,
        default=default_of(BUILD_CONFIG, "seed"),
        metavar="N",
        help="seed of the encoder, decoders and head (and of the int8 calibration sample)",
    )
    build.add_argument(
        "--runs",
        type=int,
        default=default_of(BUILD_CONFIG, "runs"),
        metavar="N",
        help="timed ONNX Runtime runs at batch 1 and per cell of the latency table",
    )
    executor_options(build)
    deploy_options(build)
    out_dir_options(build, required=True, metavar="OUTDIR")
    json_option(build)
    build.set_defaults(run=cmd_pack_build, render=render_pack_build)

    list_ = actions.add_parser(
        "list",
        help="what a fragment store offers: sources, one row per fragment, settings",
        description="Read STORE, check every file it names by its sha256, and list its slicing settings, its "
        "sources and one row per fragment (class, source, units kept, params, MACs, feature dim, slicing time, "
        "samples hash).",
        epilog="examples:\n  zoocompile pack list store\n  zoocompile pack list store --json",
    )
    _store_argument(list_)
    json_option(list_)
    list_.set_defaults(run=cmd_pack_list, render=render_pack_list)
