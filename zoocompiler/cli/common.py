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
