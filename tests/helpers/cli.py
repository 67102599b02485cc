"""Command-line test helpers: running ``zoocompile`` in process, the one-line error format, an output
location left untouched, the sub-commands of a parser and their help, JSON output and rendered tables."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from typing import Any


def run_cli(*argv: object) -> tuple[int, str, str]:
    """``zoocompiler.cli.main(argv)`` in process (arguments ``str``-ed); returns (exit code, stdout, stderr)."""
    from zoocompiler import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _no_constants(name: str):
    raise AssertionError(f"--json printed {name}, which is not standard JSON")


def run_json(*argv: object) -> dict:
    """``zoocompile ARGV --json`` in process: it must exit 0 and print standard JSON (no NaN/Infinity)."""
    code, out, err = run_cli(*argv, "--json")
    assert code == 0, err
    return json.loads(out, parse_constant=_no_constants)


def strict_json(value: Any) -> Any:
    """``value`` as ``--json`` prints it: NaN (an unmeasured metric) becomes null."""
    return json.loads(json.dumps(value), parse_constant=lambda _name: None)


def rendered(render, data: dict) -> str:
    """What a command's table renderer prints for ``data`` on a 200-column console."""
    from rich.console import Console

    buffer = io.StringIO()
    render(Console(file=buffer, width=200, soft_wrap=False), data)
    return buffer.getvalue()


def assert_one_line_error(err: str, fragment: str) -> None:
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert fragment in err, err


def assert_nothing_written(out_dir: Path) -> None:
    """Neither ``out_dir`` nor any staging sibling of it (``.NAME.*``) exists."""
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]


def assert_help_documents_every_option(command: list[str]) -> None:
    """``zoocompile COMMAND --help`` exits 0, and every option (and sub-command) of that parser is in it with help."""
    from zoocompiler import cli

    parser = cli.build_parser()
    for word in command:
        parser = subparsers(parser)[word]
    code, out, _ = run_cli(*command, "--help")
    assert code == 0
    assert out.startswith(f"usage: zoocompile {' '.join(command)}")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(name in out for name in action.choices)
            continue
        assert action.help, f"{action.dest} has no help text"
        assert all(flag in out for flag in action.option_strings)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Sub-command name → its parser, for every sub-command ``parser`` declares."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found
