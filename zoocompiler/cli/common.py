"""What the ``zoocompile`` command modules share: the parser class and its help formatter, option
groups (model, ``--json``, ``--out``/``--force``), defaults read from the library's config dataclasses,
the model + example input a command line names, rich tables, progress lines and ``--json`` output.

Nothing here imports torch at module level: ``zoocompile --help`` builds every parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zoocompiler.core.errors import InputShapeError, ZooError
from zoocompiler.core.jsonable import jsonable
from zoocompiler.pipelines.base import Progress

EXAMPLE_SEED = 0
SPEC_HELP = "model spec SOURCE:NAME[,key=value...], e.g. torchvision:resnet18 or timm:vit_tiny_patch16_224,img_size=32"


# ----------------------------------------------------------------------------- defaults from the config dataclasses


def default_of(config: type, name: str) -> Any:
    """The default of field ``name`` of the config dataclass ``config``: an argparse ``default=`` with
    one source of truth (config modules are torch-free, so ``--help`` stays fast)."""
    default = {f.name: f for f in dataclasses.fields(config)}[name].default
    if default is dataclasses.MISSING:  # a default_factory or none: not an option default
        raise LookupError(f"{config.__name__}.{name} has no plain default")
    return default


def config_from_args(config: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of the config dataclass ``config`` whose fields take the parsed option of the same name
    (``--batch-size`` → ``batch_size``), ``values`` overriding; fields without an option keep their default."""
    parsed = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    return config(**{**parsed, **values})


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps example epilogs as written; shows every default (0 and 0.0 included) except None, False
    (an unset option, an off flag) and ``argparse.SUPPRESS``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not ``in (None, False, ...)``: 0 == False, and a default of 0 must show
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if not hidden and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """The parser of ``zoocompile`` and of every command (``add_subparsers`` reuses the class):
    :class:`Formatter` by default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)


# ----------------------------------------------------------------------------- option groups


def model_options(parser: argparse.ArgumentParser) -> None:
    """``--input-shape``, ``--batch``, ``--checkpoint``, ``--pretrained``, ``--allow-pickle``: what
    :func:`load_model_and_input` reads."""
    parser.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="input shape without the batch dimension (default: the model's own, e.g. 3,224,224)",
    )
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="batch size of the example input")
    parser.add_argument("--checkpoint", metavar="FILE", help="load weights from a .pt/.pth/.safetensors file")
    parser.add_argument(
        "--pretrained", action="store_true", help="fetch the source's default pretrained weights (needs network)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow checkpoints that contain pickled Python objects (runs their code: only for trusted files)",
    )


def training_options(parser: argparse.ArgumentParser, config: type, *, min_batch: int = 1,
                     spec_help: str | None = None, from_scratch: bool = True) -> None:
    """The options of a training run whose ``config`` dataclass has ``data``, ``checkpoint``, ``epochs``, ``lr``
    and ``batch_size``: ``SPEC``, ``--data``, ``--from-scratch``, ``--checkpoint FILE``, ``--allow-pickle``,
    ``--epochs``, ``--lr``, ``--batch-size``. With ``spec_help`` the SPEC is optional (default: the config's
    ``spec``); ``from_scratch=False`` leaves ``--from-scratch`` out."""
    if spec_help is None:
        parser.add_argument(
            "spec", metavar="SPEC", help="model spec, e.g. zoo:vgg_s or timm:resnet18,in_chans=1,num_classes=10"
        )
    else:
        parser.add_argument("spec", metavar="SPEC", nargs="?", default=default_of(config, "spec"), help=spec_help)
    parser.add_argument(
        "--data", default=default_of(config, "data"), metavar="DATA", help="digits, mnist5k, npz:PATH, imagefolder:PATH"
    )
    if from_scratch:
        parser.add_argument("--from-scratch", action="store_true", help="re-initialise the weights before training")
    parser.add_argument(
        "--checkpoint",
        default=default_of(config, "checkpoint"),
        metavar="FILE",
        help="start from these weights (.pt/.pth/.safetensors)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a --checkpoint that contains pickled Python objects (runs their code: only for trusted files)",
    )
    parser.add_argument("--epochs", type=int, default=default_of(config, "epochs"), metavar="N", help="training epochs")
    parser.add_argument(
        "--lr", type=float, default=default_of(config, "lr"), help="peak learning rate (AdamW, one-cycle)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=default_of(config, "batch_size"),
        metavar="N",
        help="training batch size" + (f" (>= {min_batch})" if min_batch > 1 else ""),
    )


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout (and nothing else)")


def out_dir_options(
    parser: argparse.ArgumentParser,
    *,
    required: bool = False,
    default: str | None = None,
    metavar: str = "DIR",
    help: str = "output directory (new, or --force)",
) -> None:
    """``--out`` and ``--force``: a directory the command writes all or nothing
    (``core.atomic.check_out_dir`` first, then ``core.atomic.staged_dir``)."""
    parser.add_argument("--out", required=required, default=default, metavar=metavar, help=help)
    parser.add_argument("--force", action="store_true", help="replace an existing --out directory")


def written_files(out: Path) -> dict[str, str]:
    """``{name: path}`` of the files in the output directory ``out``, sorted by name."""
    return {p.name: str(out / p.name) for p in sorted(out.iterdir())}


# ----------------------------------------------------------------------------- model + input


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``"3,224,224"`` → ``(3, 224, 224)``; anything else is an ``InputShapeError``."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise InputShapeError(f"bad --input-shape '{text}'", "write C,H,W as three positive integers, e.g. 3,224,224")
    return dims  # type: ignore[return-value]


def check_at_least(args: argparse.Namespace, minimum: float, *names: str) -> None:
    """Raise ``ZooError`` naming the flag and the value typed when an option ``names`` is below ``minimum``
    (options left at ``None`` are skipped); call it before anything slow or anything written."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            flag = "-K" if name == "k" else "--" + name.replace("_", "-")
            at_least = f">= {minimum:g}" if minimum else "a number >= 0"
            raise ZooError(f"bad {flag} {value}", f"pass {flag} {at_least}")


def check_batch(batch: int) -> int:
    if batch < 1:
        raise InputShapeError(f"bad --batch {batch}", "pass a positive batch size, e.g. --batch 1")
    return batch


def load_model_and_input(args: argparse.Namespace):
    """The model and the seeded example input (batch × C×H×W) that :func:`model_options` ask for."""
    import torch

    from zoocompiler.sources import default_input_shape, load_model

    batch = check_batch(args.batch)
    shape = parse_input_shape(args.input_shape) if args.input_shape else None  # fail before the slow load
    model = load_model(
        args.spec, pretrained=args.pretrained, checkpoint=args.checkpoint, allow_pickle=args.allow_pickle
    )
    shape = shape or default_input_shape(model, args.spec)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(EXAMPLE_SEED))
    return model, x


# ----------------------------------------------------------------------------- output


def console():
    """The rich console that renders a command's tables on stdout."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[str] = ()):
    """A rich table of plain text (no markup); ``right`` columns are right-aligned; empty names hide the header."""
    from rich.table import Table
    from rich.text import Text

    result = Table(title=Text(title), title_justify="left", header_style="bold", show_header=any(columns))
    for column in columns:
        result.add_column(column, justify="right" if column in right else "left", overflow="fold")
    for row in rows:
        result.add_row(*(Text(str(cell)) for cell in row))
    return result


def classes_text(classes: Any) -> str:
    """A zoo entry's classes for a table cell: the list, or their count if there are more than 10."""
    if isinstance(classes, list):
        return ",".join(map(str, classes)) if len(classes) <= 10 else f"{len(classes)} classes"
    return str(classes)


def progress(args: argparse.Namespace) -> Progress | None:
    """Step messages on stderr (``None`` with --json: silent)."""
    if getattr(args, "json", False):
        return None
    from rich.console import Console

    stderr = Console(stderr=True)
    return lambda text: stderr.print(f"[dim]·[/dim] {text}")


def progress_or_silent(args: argparse.Namespace) -> Progress:
    """Like :func:`progress`, but a no-op instead of ``None`` with --json."""
    return progress(args) or (lambda _text: None)


def print_json(data: Any) -> None:
    """``--json``: ``data`` as JSON (``core.jsonable.jsonable``) on stdout."""
    print(json.dumps(jsonable(data), indent=2))


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, newlines included, as one space: error messages stay one line."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- executor


def executor_options(parser: argparse.ArgumentParser, latency: bool = True) -> None:
    """``--executor local|ray|ray=ADDRESS`` and (``latency``: the command measures latency) ``--latency-node IP``."""
    group = parser.add_argument_group("scale-out (docs/scale.md)")
    group.add_argument(
        "--executor", default="local", metavar="local|ray|ray=ADDRESS",
        help="where independent items (and --workers) run: in this process (local, default), on a local Ray "
        "instance (ray) or on the Ray cluster at ADDRESS (what `ray start --head` prints); results are the same",
    )
    if latency:
        group.add_argument(
            "--latency-node", metavar="IP",
            help="with --executor ray=ADDRESS: measure latency on the cluster node with this IP (the target "
            "hardware); default: this machine, never an arbitrary worker",
        )


def workers_options(parser: argparse.ArgumentParser) -> None:
    """``--workers N`` (data-parallel training, ``pipelines.data_parallel``) and ``--executor`` (the Ray cluster the
    workers run on)."""
    from zoocompiler.pipelines.data_parallel import WORKERS_HELP

    parser.add_argument("--workers", type=int, default=1, metavar="N", help=WORKERS_HELP)
    executor_options(parser, latency=False)


def executor_from_args(args: argparse.Namespace):
    """The executor of ``--executor``/``--latency-node``, connected now (a bad address, an unreachable cluster or
    workers with another version fail before any work); its progress messages follow the command's."""
    from zoocompiler.pipelines.executors import parse_executor

    executor = parse_executor(args.executor, getattr(args, "latency_node", None), progress=progress(args))
    if executor.remote:
        executor.connect()
    return executor


# ----------------------------------------------------------------------------- deployment precision


def deploy_options(
    parser: argparse.ArgumentParser, *, data: bool = False, target: bool = False, latency: bool = True
) -> None:
    """The options of every command that writes ONNX (``core.deploy.DeployOptions``): ``--precision``,
    ``--io-types``, ``--calibration-size``, ``--latency-batch``, ``--latency-runs``, ``--latency-threads``,
    ``--provider``. ``data``: also ``--data`` (commands without a task of their own: int8 calibration and
    accuracy); ``target``: also ``--target`` (commands whose plans have a ``--round-to``); ``latency=False``:
    no latency-table options (a command that writes no table). Add it after the command's own options: a
    ``--runs``/``--threads``/``--latency-batch`` it already has serves the table."""
    from zoocompiler.core.deploy import IO_TYPES, PRECISIONS, PROVIDERS, TARGET_ROUND_TO, DeployOptions

    group = parser.add_argument_group("deployment (docs/deploy.md)")
    group.add_argument(
        "--precision", choices=PRECISIONS, default=default_of(DeployOptions, "precision"),
        help="precision of the written ONNX model: fp16 (GPU), int8 (CPU/edge, calibrated on the data)",
    )
    group.add_argument(
        "--io-types", choices=IO_TYPES, default=default_of(DeployOptions, "io_types"),
        help="fp16 only: type of the model's inputs and outputs",
    )
    if data:
        group.add_argument(
            "--data", metavar="DATA",
            help="digits, mnist5k, npz:PATH, imagefolder:PATH: int8 calibration (train split) and accuracy (test)",
        )
    group.add_argument(
        "--calibration-size", type=int, default=default_of(DeployOptions, "calibration_size"), metavar="N",
        help="int8: calibration rows, a seeded sample of the training split",
    )
    group.add_argument(
        "--int8-max-drop", type=float, default=default_of(DeployOptions, "int8_max_drop"), metavar="POINTS",
        help="int8 with test data: losing more accuracy points than this re-quantizes with the stem and classifier "
        "in float (the more accurate model is kept)",
    )
    table_options = (
        ("--latency-batch", "latency_batch", "latency table: the batch measured besides 1"),
        ("--latency-runs", "latency_runs", "latency table: timed runs per cell (0: no table)"),
        ("--latency-threads", "latency_threads", "latency table: ONNX Runtime intra-op threads (0: all cores)"),
    )
    for flag, name, text in table_options if latency else ():
        if _has_option(parser, flag, LATENCY_ALIASES.get(name)):  # the command's own timing option serves
            continue
        group.add_argument(flag, type=int, default=default_of(DeployOptions, name), metavar="N", help=text)
    group.add_argument(
        "--provider", choices=tuple(PROVIDERS), default=default_of(DeployOptions, "provider"),
        help="execution provider that checks the written model (cuda/tensorrt need the gpu extra and a GPU)",
    )
    if target:
        group.add_argument(
            "--target", choices=tuple(TARGET_ROUND_TO),
            help="sets the --round-to default: gpu 8 (fp16 tensor cores), cpu 16 (x86 NCHWc blocks), any none "
            "(default: gpu with --precision fp16, cpu with int8, any with fp32)",
        )


# a command's own timing options that the latency table uses instead of --latency-runs/--latency-threads
LATENCY_ALIASES = {"latency_runs": "--runs", "latency_threads": "--threads"}


def _has_option(parser: argparse.ArgumentParser, *flags: str | None) -> bool:
    return any(flag in parser._option_string_actions for flag in flags if flag)


def deploy_from_args(args: argparse.Namespace):
    """The ``DeployOptions`` of the parsed :func:`deploy_options`, checked (``--runs``/``--threads`` of a command
    that has them stand for ``--latency-runs``/``--latency-threads``)."""
    from zoocompiler.core.deploy import DeployOptions

    aliases = {name: getattr(args, flag[2:]) for name, flag in LATENCY_ALIASES.items()
               if not hasattr(args, name) and hasattr(args, flag[2:])}
    check_at_least(args, 0, *(LATENCY_ALIASES[name][2:] for name in aliases))  # named as typed: --runs, --threads
    options = config_from_args(DeployOptions, args, **aliases)
    options.check()
    return options


def deploy_data(args: argparse.Namespace, example):
    """``(calibration x, (test x, test y))`` from ``--data`` shaped like ``example`` (images resized to its
    square size), or ``(None, None)`` without ``--data``. A sample shape the model does not take is a
    ``ZooError``, raised before any export."""
    if not getattr(args, "data", None):
        return None, None
    from zoocompiler.data import load_dataset

    shape = tuple(example.shape[1:])
    size = shape[-1] if len(shape) == 3 and shape[-1] == shape[-2] else None
    train = load_dataset(args.data, "train", image_size=size)
    test = load_dataset(args.data, "test", image_size=size)
    if tuple(train.input_shape) != shape:
        raise InputShapeError(
            f"--data {args.data} has samples of shape {tuple(train.input_shape)}, the model takes {shape}",
            "pass --input-shape matching the data (e.g. 1,28,28) and a model with that many input channels "
            "(timm: in_chans=1)",
        )
    return train.x, (test.x, test.y)


def chosen_latency(deploy: dict[str, Any]) -> dict[str, Any] | None:
    """The latency-table row of the written precision on the CPU at batch 1 (``None`` without a table)."""
    for row in deploy.get("latency", []):
        if (row["precision"], row["provider"], row["batch"]) == (deploy["precision"], "CPUExecutionProvider", 1):
            return row
    return None


def _pp(change: float | None) -> str:
    return "-" if change is None else f"{100 * change:+.1f} pp"


def _ms(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    return f"{row['median_ms']:.3f}" if row.get("status") == "ok" else str(row.get("status"))


def render_deploy(console_: Any, deploy: dict[str, Any], title: str = "deployment") -> None:
    """The precision table (size, parity, accuracy) and the latency table of an ``export_deployable`` report."""
    from zoocompiler.core.text import human

    rows = []
    for precision, r in deploy["precisions"].items():
        chosen = " (written)" if precision == deploy["precision"] else ""
        if r.get("error"):
            rows.append([precision + chosen, "-", f"not built: {r['error']}", "-", "-", "-"])
            continue
        parity = "-" if r.get("rel_diff") is None else f"rel {r['rel_diff']:.2g}"
        if r.get("rel_tolerance") is not None:
            parity += f" (≤ {r['rel_tolerance']:g})"
        accuracy = "-" if r.get("accuracy") is None else f"{r['accuracy']:.1%}"
        agreement = "-" if r.get("agreement") is None else f"{r['agreement']:.1%}"
        rows.append([precision + chosen, human(r["file_bytes"]) + "B", parity, accuracy,
                     _pp(r.get("accuracy_change")), agreement])
    calib = deploy.get("calibration")
    note = f", int8 calibrated on {calib['rows']} rows" if calib else ""
    console_.print(table(f"{title}: {deploy['precision']} written to {deploy['path']}{note}",
                         ["precision", "size", "parity vs PyTorch fp32", "accuracy", "vs fp32", "agrees with fp32"],
                         rows, right=("size", "accuracy", "vs fp32", "agrees with fp32")))
    cells = {(r["precision"], r["provider"], r["batch"]): r for r in deploy.get("latency", [])}
    if not cells:
        return
    batches = sorted({b for _, _, b in cells})
    lat_rows = []
    for provider in dict.fromkeys(prov for _, prov, _ in cells):
        name = provider.removesuffix("ExecutionProvider")
        mine = [r for r in deploy["latency"] if r["provider"] == provider]
        if all(r.get("status") != "ok" for r in mine):  # one line for a provider that cannot run here
            why = f"not available ({mine[0].get('why') or 'unknown'})"
            lat_rows.append([name, "all", why, *([""] * (len(batches) - 1))])
            continue
        for precision in dict.fromkeys(r["precision"] for r in mine):
            lat_rows.append([name, precision, *(_ms(cells.get((precision, provider, b))) for b in batches)])
    columns = ["provider", "precision", *(f"batch {b} ms" for b in batches)]
    console_.print(table("ONNX Runtime latency (median)", columns, lat_rows, right=columns[2:]))
