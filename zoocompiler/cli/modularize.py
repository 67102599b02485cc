"""``zoocompile modularize train | extract | reuse``: Modularizing while Training (paper 004) on the command line.

``modularize train`` builds a ``ModularizeTrainConfig``, ``extract`` a ``ModularizeExtractConfig`` and ``reuse``
a ``ModularizeReuseConfig``; their options default to the configs' field defaults. Every command prints standard
JSON with ``--json`` (NaN → null), sends progress to stderr and writes its output directory all or nothing.
``extract`` and ``reuse`` read the trained directory's record (and refuse a ``python:`` spec in it without
``--trust-code``, class ids the model lacks, an ``--out`` that would replace it) before anything is written.
They write their ONNX files at ``--precision`` (``cli.common.deploy_options``, with ``--target`` choosing the
``--round-to`` default) and render the precision and latency tables (``render_deploy``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.text import human

from ..core.classes import check_classes, parse_classes
from ..pipelines.base import run_staged
from ..pipelines.data_parallel import check_workers
from ..pipelines.modularize.config import (
    HEADS,
    RESIDUAL_LAYOUTS,
    SEMANTICS,
    ModularizeExtractConfig,
    ModularizeReuseConfig,
    ModularizeTrainConfig,
)
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

TRAIN_CONFIG, EXTRACT_CONFIG, REUSE_CONFIG = ModularizeTrainConfig, ModularizeExtractConfig, ModularizeReuseConfig
TRUST_HELP = (
    "allow a python: model spec in DIR/modularize.json (imports and runs its code: only for directories you "
    "trained yourself)"
)


# ----------------------------------------------------------------------------- modularize train


def train_config(args: argparse.Namespace) -> ModularizeTrainConfig:
    """The ``ModularizeTrainConfig`` the command line asks for."""
    check_at_least(args, 0, "seed", "weight_decay")
    return config_from_args(ModularizeTrainConfig, args, standard=not args.no_standard)


def cmd_modularize_train(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.modularize.train import train_to_dir

    config = train_config(args)
    config.check()
    workers = check_workers(args.workers, config.batch_size)
    executor_from_args(args)  # joins the cluster (--executor ray=ADDRESS) the workers run on
    out = Path(args.out)
    say = progress_or_silent(args)
    record = run_staged(
        config, out, args.force,
        lambda staging: train_to_dir(config, staging, progress=not args.json, say=say, workers=workers),
    )
    return jsonable({"out": str(out), **record, "files": written_files(out)}, finite=True)


# ----------------------------------------------------------------------------- extract, reuse: the trained directory


def read_trained_record(directory: Path, trust_code: bool) -> dict[str, Any]:
    """``DIR/modularize.json``, checked, with its spec allowed (``--trust-code``) before anything is written."""
    from zoocompiler.pipelines.modularize.train import RECORD_FILE, TRUST_FIX, read_record
    from zoocompiler.sources import check_spec_from_file

    record = read_record(directory)
    where = f"{directory / RECORD_FILE} (config.spec)"
    check_spec_from_file(record["config"]["spec"], where, trust_code=trust_code, fix=TRUST_FIX)
    return record


def out_beside(directory: Path, out_arg: str) -> Path:
    """``--out``; refuses a path whose replacement (``--force``) would delete the trained directory."""
    from zoocompiler.core.atomic import check_keeps

    out = Path(out_arg)
    check_keeps(out, directory, "the trained directory", directory.parent / (directory.name + "_modules"))
    return out


# ----------------------------------------------------------------------------- modularize extract


def extract_config(args: argparse.Namespace) -> ModularizeExtractConfig:
    return config_from_args(ModularizeExtractConfig, args, deploy=deploy_from_args(args))


def cmd_modularize_extract(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.modularize.extract import extract_to_dir

    config = extract_config(args)
    config.check()
    directory = Path(args.dir)
    read_trained_record(directory, config.trust_code)
    out = out_beside(directory, args.out)
    say = progress_or_silent(args)
    executor = executor_from_args(args)
    report = run_staged(config, out, args.force,
                        lambda staging: extract_to_dir(directory, staging, config, say=say, executor=executor))
    return jsonable({"out": str(out), **report, "files": written_files(out)}, finite=True)


# ----------------------------------------------------------------------------- modularize reuse


def reuse_config(args: argparse.Namespace) -> ModularizeReuseConfig:
    check_at_least(args, 0, "seed")  # --runs: deploy_from_args
    return config_from_args(ModularizeReuseConfig, args, classes=parse_classes(args.classes),
                            deploy=deploy_from_args(args))


def cmd_modularize_reuse(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.pipelines.modularize.reuse import reuse_to_dir

    config = reuse_config(args)
    config.check()
    directory = Path(args.dir)
    record = read_trained_record(directory, config.trust_code)
    check_classes(list(config.classes), int(record["num_classes"]))  # before --out is touched
    out = out_beside(directory, args.out)
    say = progress_or_silent(args)
    executor = executor_from_args(args)
    report = run_staged(
        config,
        out,
        args.force,
        lambda staging: reuse_to_dir(directory, staging, config, say=say, progress=not args.json, executor=executor),
    )
    return jsonable({"out": str(out), **report, "files": written_files(out)}, finite=True)


# ----------------------------------------------------------------------------- rendering


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _files(data: dict[str, Any]) -> list[str]:
    return ["files", ", ".join(data["files"].values())]


def _written(result: dict[str, Any]) -> str:
    """The written ONNX file's accuracy on ONNX Runtime and its change against fp32, e.g. ``97.22% (-2.8 pp)``."""
    if result.get("accuracy") is None:
        return "-"
    change = result.get("accuracy_change")
    return f"{result['accuracy']:.2%}" + ("" if change is None else f" ({100 * change:+.1f} pp)")


def _rounding(data: dict[str, Any]) -> list[str]:
    return ["kept sets rounded to", f"multiples of {data['round_to']} ({data['round_to_reason']}); ONNX written in "
                                    f"{data['precision']}"]


def render_modularize_train(console, data: dict[str, Any]) -> None:
    cfg = data["config"]
    columns = ["model", "test accuracy", "cohesion", "coupling", "kernel rate", "s/epoch"]
    rows = [
        [
            run,
            _pct(s["accuracy"]),
            _num(s["cohesion"]),
            _num(s["coupling"]),
            _pct(s["kernel_rate"]),
            _num(s["seconds_per_epoch"], 2),
        ]
        for run in ("modular", "standard")
        if (s := data.get(run))
    ]
    title = f"modularize train {cfg['spec']} on {cfg['data']} (alpha {cfg['alpha']:g}, beta {cfg['beta']:g})"
    console.print(table(title, columns, rows, right=columns[1:]))
    summary = [
        ["mask generators", f"{len(data['points'])} ({data['kernels']} kernels)"],
        ["start", "from scratch" if cfg["from_scratch"] else (cfg["checkpoint"] or "the spec's weights")],
        [
            "training",
            f"{cfg['epochs']} epoch(s), lr {cfg['lr']:g}, batch {cfg['batch_size']}, weight decay "
            f"{cfg['weight_decay']:g}, seed {cfg['seed']}" + ("" if cfg["standard"] else "; no standard model"),
        ],
        ["metrics", "last epoch, averaged over its batches (no threshold); kernel rate = kernels used per sample"],
    ]
    if data["skipped"]:
        summary.append(["not gated", ", ".join(f"{k} ({v})" for k, v in data["skipped"].items())])
    summary.append(_files(data))
    console.print(table("", ["", ""], summary))


def render_modularize_extract(console, data: dict[str, Any]) -> None:
    acc, mods, std = data["accuracy"], data["modules"], data["standard_modules"]
    columns = ["modules of", "standard acc", "modular acc", "KRR", "cohesion", "coupling"]
    rows = [["the modular model (MwT)", _pct(acc["standard"]), _pct(acc["modular"]), _pct(mods["krr"]),
             _num(mods["cohesion"]), _num(mods["coupling"])]]  # fmt: skip
    if std:
        rows.append(["the standard model", _pct(acc["standard"]), "-", _pct(std["krr"]), _num(std["cohesion"]),
                     _num(std["coupling"])])  # fmt: skip
    title = f"modularize extract {data['spec']} on {data['data']} (τ {data['threshold']:g}) → {data['out']}"
    console.print(table(title, columns, rows, right=columns[1:]))
    sem, model = data["semantics"], data["model"]
    per_module = {m["class"]: m for m in mods["per_module"]}
    columns = ["class", "kernels", "cohesion", "coupling", f"MACs ({sem})", "recall", "parity (gated)", "τ lowered"]
    rows = [
        [
            r["class"],
            f"{r['kernels']}/{model['kernels']} ({r['kernels'] / model['kernels']:.0%})",
            _num(per_module[r["class"]]["cohesion"]),
            _num(per_module[r["class"]]["coupling"]),
            f"{human(r[sem]['macs'])} ({r[sem]['macs'] / max(model['macs'], 1):.0%})",
            _pct(r[sem]["recall"]),
            "-" if r["gated"]["parity"] is None else f"{r['gated']['parity']:.2g}",
            f"{len(r['lowered'])} layer(s)" if r["lowered"] else "-",
        ]
        for r in data["per_class"]
    ]
    precision = data["precision"]
    columns.append(f"recall ({precision} ONNX)")
    for row, r in zip(rows, data["per_class"], strict=True):
        row.append(_written(r["onnx_precision"]))
    console.print(table(f"one module per class ({sem} semantics)", columns, rows, right=columns[1:7] + columns[8:]))
    summary = [
        ["model", f"{model['kernels']} kernels, {human(model['params'])} params, {human(model['macs'])} MACs"],
        ["recall", "the module's accuracy on its own class's test samples (PyTorch; ONNX: the written file, "
                   "change vs fp32)"],
        ["parity", "max |gated module − modular model with the module's mask| on those samples"],
        _rounding(data),
        _files(data),
    ]
    console.print(table("", ["", ""], summary))
    if data.get("deploy"):
        render_deploy(console, data["deploy"], f"class_{data['deploy_class']}.onnx (the largest module)")


def render_modularize_reuse(console, data: dict[str, Any]) -> None:
    module, whole = data["module"], data["whole"]
    total = data["total_kernels"]
    precision = data["precision"]
    columns = ["model", "kernels", "KRR", "params", "MACs", f"latency b1 (ms, {precision})", "accuracy",
               f"accuracy ({precision} ONNX)", "ONNX parity"]
    rows = [
        [f"mixed module ({data['semantics']})", data["kernels"], _pct(data["krr"]), human(module["params"]),
         human(module["macs"]), f"{module['latency_ms']:.3f}", _pct(module["accuracy"]),
         _written(module["onnx_precision"]), f"{module['onnx_max_abs_diff']:.2g}"],
        [f"whole model ({data['whole_model']})", "-" if total is None else total, "100.00%", human(whole["params"]),
         human(whole["macs"]), f"{whole['latency_ms']:.3f}", _pct(whole["accuracy"]),
         _written(whole["onnx_precision"]), f"{whole['onnx_max_abs_diff']:.2g}"],
    ]  # fmt: skip
    classes = ",".join(map(str, data["classes"]))
    title = f"modularize reuse {data['spec']}: classes {classes} (τ {data['threshold']:g}) → {data['out']}"
    console.print(table(title, columns, rows, right=columns[1:]))
    if data["head"] == "slice":
        head = "slice: the classifier rows of those classes, no training"
    else:
        head = f"new: a random {len(data['classes'])}-class layer, both fine-tuned {data['finetune_epochs']} epoch(s)"
    summary = [
        ["MACs module / whole", f"{data['mac_ratio']:.2f}"],
        ["latency module / whole", f"{data['latency_ratio']:.2f}"],
        ["accuracy module − whole", f"{data['accuracy_delta'] * 100:+.2f} points"],
        ["head", head],
        _rounding(data),
        _files(data),
    ]
    console.print(table("", ["", ""], summary))
    render_deploy(console, data["deploy"], "mixed module")


# ----------------------------------------------------------------------------- parser


def _module_options(parser: argparse.ArgumentParser, config: type) -> None:
    """``--threshold``, ``--semantics``, ``--trust-code``: how extract and reuse cut modules."""
    parser.add_argument(
        "--threshold",
        type=float,
        default=default_of(config, "threshold"),
        metavar="TAU",
        help="a module keeps a kernel used by more than TAU of its class's training samples, in (0, 1]",
    )
    parser.add_argument(
        "--semantics",
        default=default_of(config, "semantics"),
        metavar="|".join(SEMANTICS),
        help="gated: keep the mask generators on the kept kernels (equals the modular model with the module's "
        "mask); static: drop them (the paper's modules); calibrated: drop them and scale each kept kernel by its "
        "mean mask over the module's classes' training samples (no generator cost)",
    )
    parser.add_argument(
        "--residual",
        default=default_of(config, "residual"),
        metavar="|".join(RESIDUAL_LAYOUTS),
        help="residual adds: pad (each producer keeps its own kernels, zero-padded into the union before the add; "
        "fewest MACs) or union (every producer keeps the union: no scatter ops)",
    )
    parser.add_argument(
        "--round-to",
        type=int,
        default=default_of(config, "round_to"),
        metavar="N",
        help="grow every kept kernel set to a multiple of N with the next most used kernels (8: GPU fp16 tensor "
        "cores, 16: x86 CPU blocked conv kernels); 1 keeps the exact sets (default: from --target: 8 with "
        "--precision fp16, 16 with int8, 1 with fp32)",
    )
    parser.add_argument("--trust-code", action="store_true", help=TRUST_HELP)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``modularize train``, ``modularize extract`` and ``modularize reuse`` to the ``zoocompile`` sub-parsers."""
    modularize = commands.add_parser(
        "modularize",
        help="modularizing while training: train a modular model, extract one module per class, reuse a few",
        description="Modularizing while Training (paper 004): train a model with mask generators and the "
        "cohesion/coupling losses, cut one module per class out of it, and reuse the mixed module of a few "
        "classes instead of the whole model.",
    )
    actions = modularize.add_subparsers(dest="modularize_command", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train",
        help="train a modular model (mask generators, CE + alpha·cohesion + beta·coupling) and a standard one",
        description="Load SPEC, add one mask generator per producer of every prunable unit group, train it on "
        "CE + alpha·L_ch + beta·L_cp, train the same model with plain CE next to it (unless --no-standard), and "
        "write DIR/modular.safetensors, DIR/standard.safetensors, DIR/modularize.json and DIR/training.png "
        "(all or nothing).",
        epilog="examples:\n"
        "  zoocompile modularize train zoo:vgg_s --from-scratch --data mnist5k --epochs 10 --out vgg_mwt\n"
        "  zoocompile modularize train zoo:resnet_s --alpha 0.5 --beta 1.5 --no-standard --out rs_mwt --json",
    )
    training_options(train, TRAIN_CONFIG, min_batch=2)
    train.add_argument(
        "--alpha", type=float, default=default_of(TRAIN_CONFIG, "alpha"), help="weight of the cohesion loss (Eq. 4)"
    )
    train.add_argument(
        "--beta", type=float, default=default_of(TRAIN_CONFIG, "beta"), help="weight of the coupling loss (Eq. 5)"
    )
    train.add_argument(
        "--weight-decay",
        type=float,
        default=default_of(TRAIN_CONFIG, "weight_decay"),
        metavar="WD",
        help="AdamW weight decay",
    )
    train.add_argument(
        "--no-standard",
        action="store_true",
        help="skip the standard model (no baseline rows; reuse then compares with the modular model's weights)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=default_of(TRAIN_CONFIG, "seed"),
        metavar="N",
        help="seed for data order and generators",
    )
    workers_options(train)
    out_dir_options(train, required=True)
    json_option(train)
    train.set_defaults(run=cmd_modularize_train, render=render_modularize_train)

    extract = actions.add_parser(
        "extract",
        help="cut one module per class out of a trained directory; ONNX per module, Table 2 metrics",
        description="Compute every class's kernel set on the training split, keep the kernels more than TAU of "
        "the class's samples use (a layer left empty lowers TAU by 0.05 for that layer), cut each module with "
        "the prune pass (--residual pad or union), check it, and write OUTDIR/class_<c>.onnx (at --precision; int8 "
        "calibrated on the class's training samples), OUTDIR/modules.json, OUTDIR/overlap.png and "
        "OUTDIR/report.json (all or nothing). The largest module gets a latency table per precision.",
        epilog="examples:\n"
        "  zoocompile modularize extract vgg_mwt --out vgg_modules\n"
        "  zoocompile modularize extract vgg_mwt --threshold 0.8 --semantics static --out vgg_static --json\n"
        "  zoocompile modularize extract vgg_mwt --precision fp16 --out vgg_fp16   # kept sets rounded to 8\n"
        "  zoocompile modularize extract my_mwt --trust-code --out my_modules   # trained from a python: spec",
    )
    extract.add_argument("dir", metavar="DIR", help="a directory written by `zoocompile modularize train`")
    _module_options(extract, EXTRACT_CONFIG)
    executor_options(extract)
    deploy_options(extract, target=True)
    out_dir_options(extract, required=True, metavar="OUTDIR")
    json_option(extract)
    extract.set_defaults(run=cmd_modularize_extract, render=render_modularize_extract)

    reuse = actions.add_parser(
        "reuse",
        help="reuse the mixed module of a few classes; compare with the whole model (MACs, latency, accuracy)",
        description="Build the mixed module of --classes (the union of their modules' kernels), give it and the "
        "whole (standard) model the same M-class head, export both to ONNX at --precision (int8 calibrated on "
        "those classes' training samples), time them in ONNX Runtime (the module: a latency table per "
        "precision) and evaluate them on those classes' test samples; write OUTDIR/module.onnx, OUTDIR/whole.onnx and "
        "OUTDIR/report.json (all or nothing).",
        epilog="examples:\n"
        "  zoocompile modularize reuse vgg_mwt --classes 1,3,7 --out vgg_137\n"
        "  zoocompile modularize reuse vgg_mwt --classes 0,1 --head new --finetune-epochs 5 --out vgg_01 --json\n"
        "  zoocompile modularize reuse vgg_mwt --classes 1,3,7 --precision int8 --out vgg_137_int8",
    )
    reuse.add_argument("dir", metavar="DIR", help="a directory written by `zoocompile modularize train`")
    reuse.add_argument("--classes", required=True, metavar="C,...", help="class ids of the sub-task, e.g. 1,3,7")
    reuse.add_argument(
        "--head",
        default=default_of(REUSE_CONFIG, "head"),
        metavar="|".join(HEADS),
        help="slice: keep the classifier's rows of --classes (no training); new: a random N→M layer, fine-tuned "
        "(the paper)",
    )
    reuse.add_argument(
        "--finetune-epochs",
        type=int,
        default=default_of(REUSE_CONFIG, "finetune_epochs"),
        metavar="N",
        help="fine-tuning epochs with --head new",
    )
    reuse.add_argument(
        "--lr", type=float, default=default_of(REUSE_CONFIG, "lr"), help="fine-tuning learning rate with --head new"
    )
    _module_options(reuse, REUSE_CONFIG)
    reuse.add_argument(
        "--runs",
        type=int,
        default=default_of(REUSE_CONFIG, "runs"),
        metavar="N",
        help="timed ONNX Runtime runs at batch 1 (of the written files) and per cell of the latency table",
    )
    reuse.add_argument(
        "--seed",
        type=int,
        default=default_of(REUSE_CONFIG, "seed"),
        metavar="N",
        help="seed of the new head and fine-tuning (and of the int8 calibration sample)",
    )
    executor_options(reuse)
    deploy_options(reuse, target=True)  # after --runs: it times the latency table's cells too
    out_dir_options(reuse, required=True, metavar="OUTDIR")
    json_option(reuse)
    reuse.set_defaults(run=cmd_modularize_reuse, render=render_modularize_reuse)
