"""``zoocompile zoo list`` and ``zoocompile zoo build``: the built-in demo zoo."""

from __future__ import annotations

import argparse
from typing import Any

from zoocompiler.core.jsonable import jsonable
from zoocompiler.core.text import human

from .common import classes_text, json_option, table


def cmd_zoo_list(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.zoo import list_entries

    return {"models": [jsonable(entry) for entry in list_entries()]}


def cmd_zoo_build(args: argparse.Namespace) -> dict[str, Any]:
    from zoocompiler.zoo import build_zoo

    return {"models": [jsonable(entry) for entry in build_zoo(force=args.force, progress=True)]}


def render_zoo_list(console, data: dict[str, Any], title: str = "demo zoo") -> None:
    columns = ["name", "spec", "dataset", "classes", "input", "test acc", "params", "MACs"]
    rows = [
        [
            m.get("name"),
            m.get("spec"),
            m.get("dataset"),
            classes_text(m.get("classes")),
            "×".join(map(str, m.get("input_shape") or [])),
            "-" if m.get("test_accuracy") is None else f"{m['test_accuracy']:.3f}",
            human(m.get("params")),
            human(m.get("macs")),
        ]
        for m in data["models"]
    ]
    console.print(table(title, columns, rows, right=("test acc", "params", "MACs")))


def render_zoo_build(console, data: dict[str, Any]) -> None:
    render_zoo_list(console, data, title="demo zoo (built)")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``zoo list`` and ``zoo build`` to the ``zoocompile`` sub-parser set."""
    zoo = commands.add_parser(
        "zoo", help="list or build the demo zoo", description="List or build the built-in demo zoo."
    )
    actions = zoo.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    zoo_list = actions.add_parser("list", help="list the demo-zoo models", description="List the demo-zoo models.")
    json_option(zoo_list)
    zoo_list.set_defaults(run=cmd_zoo_list, render=render_zoo_list)
    zoo_build = actions.add_parser(
        "build",
        help="train the demo-zoo models and cache their weights",
        description="Train the demo-zoo models (small, on CPU) and cache their weights.",
    )
    zoo_build.add_argument("--force", action="store_true", help="retrain even if cached weights exist")
    json_option(zoo_build)
    zoo_build.set_defaults(run=cmd_zoo_build, render=render_zoo_build)
