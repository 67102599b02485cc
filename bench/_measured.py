"""What a benchmark script does around its measurements: run them, stamp the run (wall time, arguments, machine,
versions), add the figures derived from them, write the JSON; then print the tables (rich or Markdown) and draw
the PNG."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from zoocompiler.core.atomic import write_json_atomic

Doc = dict[str, Any]


def run_measured(args: argparse.Namespace, console: Console, run: Callable[[argparse.Namespace, Console], Doc],
                 derive: Callable[[Doc], Doc]) -> Doc:
    """``run(args, console)`` stamped with its seconds, ``args`` (but ``out``), machine and versions, plus
    ``derive(doc)``'s keys; written to ``args.out``."""
    start = time.perf_counter()
    doc = run(args, console)
    doc.update(seconds=time.perf_counter() - start, args={k: v for k, v in vars(args).items() if k != "out"},
               machine=platform.platform(), python=sys.version.split()[0], torch=torch.__version__)
    doc.update(derive(doc))
    write_json_atomic(args.out, doc)
    return doc


def rederived(path: Path, derive: Callable[[Doc], Doc]) -> Doc:
    """A ``--render-only`` run's document: the JSON at ``path`` with ``derive(doc)``'s keys recomputed (the rules
    may have changed since the measurement), written back."""
    doc = json.loads(path.read_text())
    doc.update(derive(doc))
    write_json_atomic(path, doc)
    return doc


def show(doc: Doc, args: argparse.Namespace, console: Console, render: Callable[[Doc, Console], None],
         plot: Callable[..., None], *, measured: bool) -> None:
    """Print the tables, draw ``args.out``'s PNG and, after a measuring run, say what was written."""
    render(doc, console)
    plot(doc, args.out.with_suffix(".png"))
    if measured:
        console.print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {doc['seconds']:.0f} s")


def rich_table(title: str, header: Sequence[str], cells: Iterable[Sequence[str]],
               text_columns: Collection[str] = ()) -> Table:
    """A rich table titled on the left: the columns named in ``text_columns`` left-aligned, the figures
    right-aligned."""
    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column in text_columns else "right")
    for row in cells:
        table.add_row(*row)
    return table


def markdown_table(header: Sequence[str], cells: Iterable[Sequence[str]], text_columns: Collection[str] = (),
                   title: str | None = None) -> list[str]:
    """The same table as Markdown lines: a bold ``title`` and a blank line first when given, a blank line last; a
    "|" inside a cell becomes "/"."""
    out = [f"**{title}**", ""] if title is not None else []
    out += ["| " + " | ".join(header) + " |",
            "|" + "|".join("---" if h in text_columns else "---:" for h in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    return [*out, ""]
