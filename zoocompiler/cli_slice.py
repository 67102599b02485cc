"""``zoocompile slice train`` and ``zoocompile slice export``: Model Slicing (paper 003) on the command line.

Registered by ``cli.build_parser``; the commands follow the same contract as the others (a JSON-able
dict first, rendered as rich tables or printed with ``--json``; progress goes to stderr; output
directories are written all or nothing).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from .core.errors import ZooError

# The CLI defaults of `slice train` are SliceTrainConfig's (a test keeps them equal); they are spelled out
# here so that `zoocompile --help` does not import torch.
TRAIN_DEFAULTS: dict[str, Any] = {
    "data": "mnist5k",
    "lb": 0.375,
    "groups": 16,
    "scheduler": "normal",
    "rescale": "dense",
    "epochs": 10,
    "lr": 3e-3,
    "batch_size": 128,
    "seed": 0,
}
SCHEDULER_CHOICES = ("normal", "uniform", "progressive-dynamic", "progressive-static")
SCHEDULER_OPTIONS = ("mean", "std", "span", "warmup", "distribution")
EXPORT_DEFAULTS: dict[str, Any] = {"latency_batch": 32, "runs": 30}
EXPORT_SUBDIR = "export"


def _strict_json(value: Any) -> Any:
    """``value`` with NaN/infinite floats as None, so ``--json`` prints standard JSON whatever a record
    holds (e.g. an unchecked export's NaN parity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def _say(args: argparse.Namespace):
    """Step messages on stderr (silent with --json)."""
    from .cli_assemble import _progress

    return _progress(args) or (lambda _text: None)


# ----------------------------------------------------------------------------- slice train


def train_config(args: argparse.Namespace):
    """The ``SliceTrainConfig`` the command line asks for; scheduler options only where given."""
    from .pipelines.slice.train import SliceTrainConfig

    return SliceTrainConfig(
        spec=args.spec,
        data=args.data,
        lb=args.lb,
        groups=args.groups,
        scheduler=args.scheduler,
        scheduler_options={k: getattr(args, k) for k in SCHEDULER_OPTIONS if getattr(args, k) is not None},
        rescale=args.rescale,
        sort_by=args.sort_by,
        from_scratch=args.from_scratch,
        checkpoint=args.checkpoint,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def cmd_slice_train(args: argparse.Namespace) -> dict[str, Any]:
    from .core.atomic import check_out_dir, staged_dir
    from .pipelines.slice.train import train_to_dir
    from .solvers.slice_rates import make_scheduler, valid_rates

    config = train_config(args)
    config.check()
    make_scheduler(config.scheduler, valid_rates(config.groups, config.lb), **config.scheduler_options)  # fail fast
    out = Path(args.out)
    check_out_dir(out, args.force)
    with staged_dir(out, args.force) as staging:
        record = train_to_dir(config, staging, progress=not args.json)
    files = {p.name: str(out / p.name) for p in sorted(out.iterdir())}
    return _strict_json({"out": str(out), **record, "files": files})


# ----------------------------------------------------------------------------- slice export


def _parse_flops(text: str) -> list[float]:
    from .pipelines.slice.export import parse_flops

    try:
        return parse_flops(text)
    except ZooError:
        raise ZooError(
            f"bad --flops '{text}'", "pass comma-separated positive MAC budgets with k/M/G suffixes, e.g. 10M,20M"
        ) from None


def _export_dir(directory: Path, out_arg: str | None) -> Path:
    """``--out`` (default ``DIR/export``); refuses a path whose replacement would delete the trained directory."""
    out = Path(out_arg) if out_arg else directory / EXPORT_SUBDIR
    source, target = directory.resolve(), out.resolve()
    if target == source or target in source.parents:
        raise ZooError(
            f"--out {out} would replace the trained directory {directory}",
            f"pass another --out, e.g. {directory / EXPORT_SUBDIR}",
        )
    return out


def cmd_slice_export(args: argparse.Namespace) -> dict[str, Any]:
    from .core.atomic import check_out_dir, staged_dir
    from .pipelines.slice.export import export_rates
    from .pipelines.slice.train import read_record
    from .solvers.slice_rates import parse_rates

    directory = Path(args.dir)
    record = read_record(directory)
    groups, lb = record["config"]["groups"], record["config"]["lb"]
    rates = parse_rates(args.rates, groups, lb=lb) if args.rates is not None else None
    flops = _parse_flops(args.flops) if args.flops is not None else None
    if args.latency_batch < 1:
        raise ZooError(f"bad --latency-batch {args.latency_batch}", "pass a positive batch size, e.g. 32")
    if args.runs < 1:
        raise ZooError(f"bad --runs {args.runs}", "pass a positive number of timed runs, e.g. 30")
    out = _export_dir(directory, args.out)
    check_out_dir(out, args.force)
    with staged_dir(out, args.force) as staging:
        manifest = export_rates(
            directory,
            staging,
            rates=rates,
            flops=flops,
            latency_batch=args.latency_batch,
            runs=args.runs,
            say=_say(args),
        )
    files = {p.name: str(out / p.name) for p in sorted(out.iterdir())}
    return _strict_json({"out": str(out), **manifest, "files": files})


# ----------------------------------------------------------------------------- rendering


def _share(macs: int, full: int | None) -> str:
    return f"{macs / full:.0%}" if full else "-"


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def render_slice_train(console, data: dict[str, Any]) -> None:
    from .cli import _table, human

    cfg = data["config"]
    full = next((r["macs"] for r in data["rates"] if abs(r["rate"] - 1.0) < 1e-9), None)
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
    console.print(_table(title, columns, rows, right=columns[1:5]))
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
    console.print(_table("", ["", ""], summary))


def render_slice_export(console, data: dict[str, Any]) -> None:
    from .cli import _table, human

    batch = data["latency_batch"]
    rows = [
        [
            f"{r['rate']:g}",
            human(r["params"]),
            f"{human(r['macs'])} ({_share(r['macs'], data['full_macs'])})",
            f"{r['latency_ms']:.3f}",
            f"{r['per_sample_ms']:.4f}",
            _accuracy(r["accuracy"]),
            f"{r['max_abs_diff']:.2g}",
            "-" if r["budget_macs"] is None else f"≤ {human(r['budget_macs'])}",
        ]
        for r in data["rates"]
    ]
    columns = ["rate", "params", "MACs", "latency b1 (ms)", f"ms/sample b{batch}", "accuracy", "ONNX parity", "budget"]
    title = f"slice export {data['spec']} (G={data['groups']}, lb {data['lb']:g}) → {data['out']}"
    console.print(_table(title, columns, rows, right=columns[1:7]))
    summary = [
        ["source", data["source"]],
        ["timing", f"ONNX Runtime, {data['threads']} thread(s); per-sample time = median at batch {batch} / {batch}"],
        ["serve", f"ElasticModel.from_manifest('{data['out']}')"],
        ["files", ", ".join(data["files"].values())],
    ]
    console.print(_table("", ["", ""], summary))


# ----------------------------------------------------------------------------- parser


def add_commands(commands, formatter: type[argparse.HelpFormatter], json_option) -> None:
    """Register ``slice train`` and ``slice export`` on the ``zoocompile`` sub-parser set."""
    d = TRAIN_DEFAULTS
    slice_cmd = commands.add_parser(
        "slice",
        help="model slicing: train a width-sliceable model, export one ONNX model per slice rate",
        description="Model Slicing (paper 003): train a model whose every prefix of units works at one global "
        "slice rate, then export the r-subnets with a manifest for run-time rate choice.",
        formatter_class=formatter,
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
        formatter_class=formatter,
    )
    train.add_argument(
        "spec", metavar="SPEC", help="model spec, e.g. zoo:vgg_s or timm:resnet18,in_chans=1,num_classes=10"
    )
    train.add_argument("--data", default=d["data"], metavar="DATA", help="digits, mnist5k, npz:PATH, imagefolder:PATH")
    train.add_argument("--lb", type=float, default=d["lb"], metavar="R", help="lowest trained slice rate, in (0, 1]")
    train.add_argument("--groups", type=int, default=d["groups"], metavar="G", help="GroupNorm groups: rates j/G")
    train.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=d["scheduler"], help="slice-rate scheduler")
    train.add_argument("--mean", type=float, help="normal scheduler: mean of r (default 1.0)")
    train.add_argument("--std", type=float, help="normal scheduler: standard deviation of r (default 1/3)")
    train.add_argument("--span", type=float, help="uniform scheduler: r ~ U(lb - span, 1 + span) (default 0)")
    train.add_argument("--warmup", type=float, help="progressive-dynamic: fraction of training at r=1 (default 0.3)")
    train.add_argument(
        "--distribution", choices=("normal", "uniform"), help="progressive-dynamic: r's distribution after warm-up"
    )
    train.add_argument(
        "--rescale", choices=("dense", "none"), default=d["rescale"], help="rescale linear inputs M/kept"
    )
    train.add_argument("--sort-by", choices=("l1", "l2"), help="reorder units by importance first (trained weights)")
    train.add_argument("--from-scratch", action="store_true", help="re-initialise the weights before training")
    train.add_argument("--checkpoint", metavar="FILE", help="start from these weights (.pt/.pth/.safetensors)")
    train.add_argument("--epochs", type=int, default=d["epochs"], metavar="N", help="training epochs")
    train.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (AdamW, one-cycle)")
    train.add_argument("--batch-size", type=int, default=d["batch_size"], metavar="N", help="training batch size")
    train.add_argument(
        "--seed", type=int, default=d["seed"], metavar="N", help="seed for data order and slice rates (default: 0)"
    )
    train.add_argument("--out", default="sliced", metavar="DIR", help="output directory (new, or --force)")
    train.add_argument("--force", action="store_true", help="replace an existing --out directory")
    json_option(train)
    train.set_defaults(run=cmd_slice_train, render=render_slice_train)

    export = actions.add_parser(
        "export",
        help="export one verified ONNX model per slice rate with a manifest (params, MACs, latency, accuracy)",
        description="Materialise the r-subnets of a directory written by `slice train` (rates from --rates, from "
        "MAC budgets with --flops, or every trained rate), export each to ONNX with the parity check, time it in "
        "ONNX Runtime, evaluate it, and write OUTDIR/rate_*.onnx, OUTDIR/manifest.json and OUTDIR/rates.png "
        "(all or nothing).",
        epilog="examples:\n"
        "  zoocompile slice export vgg_sliced --rates 0.375,0.5,0.75,1.0 --out vgg_rates\n"
        "  zoocompile slice export vgg_sliced --flops 1M,2M --json",
        formatter_class=formatter,
    )
    export.add_argument("dir", metavar="DIR", help="a directory written by `zoocompile slice train`")
    export.add_argument("--rates", metavar="R,...", help="slice rates to export, e.g. 0.375,0.5,1 (each >= lb)")
    export.add_argument(
        "--flops", metavar="MACS,...", help="per-sample MAC budgets, e.g. 1M,2M: the largest rate within each"
    )
    export.add_argument(
        "--latency-batch",
        type=int,
        default=EXPORT_DEFAULTS["latency_batch"],
        metavar="N",
        help="batch for the per-sample time t(r) that ElasticModel uses",
    )
    export.add_argument(
        "--runs", type=int, default=EXPORT_DEFAULTS["runs"], metavar="N", help="timed ONNX Runtime runs at batch 1"
    )
    export.add_argument("--out", metavar="OUTDIR", help="output directory (default: DIR/export; new, or --force)")
    export.add_argument("--force", action="store_true", help="replace an existing --out directory")
    json_option(export)
    export.set_defaults(run=cmd_slice_export, render=render_slice_export)
