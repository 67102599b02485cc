"""``zoocompile slice train`` and ``zoocompile slice export``: Model Slicing (paper 003) on the command line.

``slice train`` builds a ``SliceTrainConfig``; its options default to the config's field defaults.
Both commands print standard JSON with ``--json`` (NaN → null), send progress to stderr and write
their output directory all or nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zoocompiler.core.atomic import check_out_dir, staged_dir
from zoocompiler.core.errors import ZooError
from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.rates import same_rate
from zoocompiler.core.text import human

from ..pipelines.base import run_staged
from ..pipelines.data_parallel import check_workers
from ..pipelines.slice.config import EXECUTIONS, SliceExportConfig, SliceTrainConfig
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
    progress_or_silent,
    render_deploy,
    table,
    training_options,
    workers_options,
    written_files,
)

TRAIN_CONFIG = SliceTrainConfig
SCHEDULER_CHOICES = ("normal", "uniform", "progressive-dynamic", "progressive-static", "sandwich")
SCHEDULER_OPTIONS = ("mean", "std", "span", "warmup", "distribution", "random")
EXPORT_SUBDIR = "export"


# ----------------------------------------------------------------------------- slice train


def train_config(args: argparse.Namespace):
    """The ``SliceTrainConfig`` the command line asks for; scheduler options only where given."""
    check_at_least(args, 0, "seed")
    options = {k: getattr(args, k) for k in SCHEDULER_OPTIONS if getattr(args, k) is not None}
    return config_from_args(SliceTrainConfig, args, scheduler_options=options)


def cmd_slice_train(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.slice.train import train_to_dir

    config = train_config(args)
    config.check()
    workers = check_workers(args.workers, config.batch_size)
    executor_from_args(args)  # joins the cluster (--executor ray=ADDRESS) the workers run on
    out = Path(args.out)
    record = run_staged(config, out, args.force,
                        lambda staging: train_to_dir(config, staging, progress=not args.json, workers=workers))
    return jsonable({"out": str(out), **record, "files": written_files(out)}, finite=True)


# ----------------------------------------------------------------------------- slice export


def _parse_flops(text: str) -> list[float]:
    from zoocompiler.pipelines.slice.export import parse_flops

    try:
        return parse_flops(text)
    except ZooError:
        raise ZooError(
            f"bad --flops '{text}'", "pass comma-separated positive MAC budgets with k/M/G suffixes, e.g. 10M,20M"
        ) from None


def _export_dir(directory: Path, out_arg: str | None) -> Path:
    """``--out`` (default ``DIR/export``); refuses a path whose replacement would delete the trained directory."""
    from zoocompiler.core.atomic import check_keeps

    out = Path(out_arg) if out_arg else directory / EXPORT_SUBDIR
    check_keeps(out, directory, "the trained directory", directory / EXPORT_SUBDIR)
    return out


def cmd_slice_export(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.slice.export import export_rates
    from zoocompiler.pipelines.slice.train import read_record, record_spec
    from zoocompiler.solvers.slice_rates import parse_rates

    directory = Path(args.dir)
    record = read_record(directory)
    record_spec(record, directory, trust_code=args.trust_code)  # refuse a python: spec before anything is written
    groups, lb = record["config"]["groups"], record["config"]["lb"]
    rates = parse_rates(args.rates, groups, lb=lb, strict=True) if args.rates is not None else None
    flops = _parse_flops(args.flops) if args.flops is not None else None
    SliceExportConfig(latency_batch=args.latency_batch, runs=args.runs).check()  # its own options first
    config = SliceExportConfig(latency_batch=args.latency_batch, runs=args.runs, deploy=deploy_from_args(args))
    config.check()
    out = _export_dir(directory, args.out)
    check_out_dir(out, args.force)
    executor = executor_from_args(args)
    with staged_dir(out, args.force) as staging:
        manifest = export_rates(
            directory,
            staging,
            rates=rates,
            flops=flops,
            latency_batch=config.latency_batch,
            runs=config.runs,
            say=progress_or_silent(args),
            trust_code=args.trust_code,
            deploy=config.deploy,
            executor=executor,
        )
    return jsonable({"out": str(out), **manifest, "files": written_files(out)}, finite=True)


# ----------------------------------------------------------------------------- rendering


def _share(macs: int, full: int | None) -> str:
    return f"{macs / full:.0%}" if full else "-"


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def render_slice_train(console, data: dict[str, Any]) -> None:
    cfg = data["config"]
    full = next((r["macs"] for r in data["rates"] if same_rate(r["rate"], 1.0)), None)
    rows = [
        [
            f"{r['rate']:g}",
            human(r["params"]),
            human(r["macs"]),
            _share(r["macs"], full),
            _accuracy(r["accuracy"]),
            "yes" if r["trained"] else "no",
        ]
        for r in data["rates"]
    ]
    title = f"slice train {cfg['spec']} on {cfg['data']} (G={cfg['groups']}, lb {cfg['lb']:g})"
    columns = ["rate", "params", "MACs", "% of full MACs", "test accuracy", "trained (≥ lb)"]
    console.print(table(title, columns, rows, right=columns[1:5]))
    options = ", ".join(f"{k}={v}" for k, v in cfg["scheduler_options"].items())
    last = data["history"][-1] if data["history"] else None
    summary = [
        ["scheduler", cfg["scheduler"] + (f" ({options})" if options else "")],
        ["start", "from scratch" if cfg["from_scratch"] else (cfg["checkpoint"] or "the spec's weights")],
        ["units", f"prefixes{', sorted by ' + cfg['sort_by'] if cfg['sort_by'] else ''}; rescale {cfg['rescale']}"],
        [
            "training",
            f"{cfg['epochs']} epoch(s), lr {cfg['lr']:g}, batch {cfg['batch_size']}, seed {cfg['seed']}, "
            f"{data['train_seconds']:.1f} s" + (f", final loss {last['loss']:.3f}" if last else ""),
        ],
        ["files", ", ".join(data["files"].values())],
    ]
    console.print(table("", ["", ""], summary))


def _change(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f} pp"


def _precision_cells(deploy: dict[str, Any]) -> list[str]:
    """A rate's written-precision cells: ONNX Runtime accuracy, its change against fp32, parity (relative)."""
    parity = "-" if deploy.get("rel_diff") is None else f"rel {deploy['rel_diff']:.2g}"
    return [_accuracy(deploy.get("accuracy")), _change(deploy.get("accuracy_change")), parity]


def render_slice_export(console, data: dict[str, Any]) -> None:
    batch = data["latency_batch"]
    precision = data.get("precision", "fp32")
    extra = precision != "fp32"  # the written files' own accuracy and parity, beside the fp32 model's
    rows = [
        [
            f"{r['rate']:g}",
            human(r["params"]),
            f"{human(r['macs'])} ({_share(r['macs'], data['full_macs'])})",
            f"{r['latency_ms']:.3f}",
            f"{r['per_sample_ms']:.4f}",
            _accuracy(r["accuracy"]),
            f"{r['max_abs_diff']:.2g}",
            *(_precision_cells(r["deploy"]) if extra else []),
            "-" if r["budget_macs"] is None else f"≤ {human(r['budget_macs'])}",
        ]
        for r in data["rates"]
    ]
    columns = ["rate", "params", "MACs", f"latency b1 (ms, {precision})", f"ms/sample b{batch}", "accuracy (fp32)",
               "ONNX parity (fp32)"]
    if extra:
        columns += [f"{precision} accuracy", "vs fp32", f"{precision} parity"]
    columns.append("budget")
    title = f"slice export {data['spec']} (G={data['groups']}, lb {data['lb']:g}) → {data['out']}: {precision}"
    console.print(table(title, columns, rows, right=columns[1:-1]))
    summary = [
        ["source", data["source"]],
        ["timing", f"ONNX Runtime, {data['threads']} thread(s); per-sample time = median at batch {batch} / {batch}"],
        ["serve", f"ElasticModel.from_manifest('{data['out']}')"],
        ["files", ", ".join(data["files"].values())],
    ]
    console.print(table("", ["", ""], summary))
    main = data.get("deploy")
    if main:
        rate = max(r["rate"] for r in data["rates"])
        render_deploy(console, {**main, "path": str(Path(data["out"]) / main["path"])}, f"rate {rate:g}")


# ----------------------------------------------------------------------------- parser


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``slice train`` and ``slice export`` to the ``zoocompile`` sub-parser set."""
    slice_cmd = commands.add_parser(
        "slice",
        help="model slicing: train a width-sliceable model, export one ONNX model per slice rate",
        description="Model Slicing (paper 003): train a model whose every prefix of units works at one global "
        "slice rate, then export the r-subnets with a manifest for run-time rate choice.",
    )
    actions = slice_cmd.add_subparsers(dest="slice_command", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train",
        help="make a model sliceable (BatchNorm → GroupNorm) and train it with random slice rates",
        description="Load SPEC, convert its BatchNorms to GroupNorm with G groups (valid rates: multiples of 1/G), "
        "train it with a slice-rate scheduler clipped to [lb, 1], evaluate every rate and write DIR/slice.json, "
        "DIR/sliceable.safetensors and DIR/accuracy.png (all or nothing).",
        epilog="examples:\n"
        "  zoocompile slice train zoo:vgg_s --from-scratch --data mnist5k --lb 0.375 --epochs 10 --out vgg_sliced\n"
        "  zoocompile slice train zoo:resnet_s --sort-by l1 --scheduler progressive-dynamic --warmup 0.3 --out rs",
    )
    training_options(train, TRAIN_CONFIG)
    train.add_argument(
        "--lb",
        type=float,
        default=default_of(TRAIN_CONFIG, "lb"),
        metavar="R",
        help="lowest trained slice rate, in (0, 1]",
    )
    train.add_argument(
        "--groups",
        type=int,
        default=default_of(TRAIN_CONFIG, "groups"),
        metavar="G",
        help="GroupNorm groups: rates j/G",
    )
    train.add_argument(
        "--scheduler",
        choices=SCHEDULER_CHOICES,
        default=default_of(TRAIN_CONFIG, "scheduler"),
        help="slice-rate scheduler",
    )
    # scheduler options: passed to the scheduler only where given (its own defaults, named in the help, apply)
    train.add_argument("--mean", type=float, help="normal scheduler: mean of r (default 1.0)")
    train.add_argument("--std", type=float, help="normal scheduler: standard deviation of r (default 1/3)")
    train.add_argument("--span", type=float, help="uniform scheduler: r ~ U(lb - span, 1 + span) (default 0)")
    train.add_argument("--warmup", type=float, help="progressive-dynamic: fraction of training at r=1 (default 0.3)")
    train.add_argument(
        "--distribution", choices=("normal", "uniform"), help="progressive-dynamic: r's distribution after warm-up"
    )
    train.add_argument("--random-rates", dest="random", type=int, metavar="N",
                       help="sandwich: rates drawn per batch besides 1 and lb (default 2)")
    train.add_argument("--distill", action="store_true",
                       help="sandwich: rates below 1 learn from the full width's predictions (in-place distillation)")
    train.add_argument(
        "--execution",
        choices=EXECUTIONS,
        default=default_of(TRAIN_CONFIG, "execution"),
        help="views: each subnet's own graph on weight slices (cheaper); masked: the full-width graph",
    )
    train.add_argument(
        "--rescale",
        choices=("dense", "none"),
        default=default_of(TRAIN_CONFIG, "rescale"),
        help="rescale linear inputs M/kept",
    )
    train.add_argument(
        "--sort-by",
        choices=("l1", "l2"),
        default=default_of(TRAIN_CONFIG, "sort_by"),
        help="reorder units by importance first (trained weights)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=default_of(TRAIN_CONFIG, "seed"),
        metavar="N",
        help="seed for data order and slice rates",
    )
    workers_options(train)
    out_dir_options(train, default="sliced")
    json_option(train)
    train.set_defaults(run=cmd_slice_train, render=render_slice_train)

    export = actions.add_parser(
        "export",
        help="export one verified ONNX model per slice rate with a manifest (params, MACs, latency, accuracy)",
        description="Materialise the r-subnets of a directory written by `slice train` (rates from --rates, from "
        "MAC budgets with --flops, or every trained rate), export each to ONNX with the parity check, time it in "
        "ONNX Runtime, evaluate it, and write OUTDIR/rate_*.onnx (at --precision), OUTDIR/manifest.json and "
        "OUTDIR/rates.png (all or nothing).",
        epilog="examples:\n"
        "  zoocompile slice export vgg_sliced --rates 0.375,0.5,0.75,1.0 --out vgg_rates\n"
        "  zoocompile slice export vgg_sliced --flops 1M,2M --json\n"
        "  zoocompile slice export vgg_sliced --rates 0.5,1 --precision int8 --out vgg_int8\n"
        "  zoocompile slice export my_sliced --trust-code   # trained from a python: spec",
    )
    export.add_argument("dir", metavar="DIR", help="a directory written by `zoocompile slice train`")
    export.add_argument("--rates", metavar="R,...", help="slice rates to export, e.g. 0.375,0.5,1 (each >= lb)")
    export.add_argument(
        "--flops", metavar="MACS,...", help="per-sample MAC budgets, e.g. 1M,2M: the largest rate within each"
    )
    export.add_argument(
        "--latency-batch",
        type=int,
        default=default_of(SliceExportConfig, "latency_batch"),
        metavar="N",
        help="batch for the per-sample time t(r) that ElasticModel uses (and the latency table's second batch)",
    )
    export.add_argument(
        "--runs",
        type=int,
        default=default_of(SliceExportConfig, "runs"),
        metavar="N",
        help="timed ONNX Runtime runs at batch 1 (and per cell of the largest rate's latency table)",
    )
    export.add_argument(
        "--trust-code",
        action="store_true",
        help="allow a python: model spec in DIR/slice.json (imports and runs its code: only for directories "
        "you trained yourself)",
    )
    # no --out default here: without one, _export_dir picks DIR/export
    out_dir_options(export, metavar="OUTDIR", help="output directory (default: DIR/export; new, or --force)")
    json_option(export)
    # every rate at --precision (int8 calibrated on the training split of the record's data); --latency-batch and
    # --runs also serve the largest rate's latency table
    executor_options(export)
    deploy_options(export)
    export.set_defaults(run=cmd_slice_export, render=render_slice_export)
