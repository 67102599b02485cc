"""Command-line test helpers: running ``zoocompile`` in process, the one-line error format, an output
location left untouched, the sub-commands of a parser and their help."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path


def run_cli(*argv: object) -> tuple[int, str, str]:
    """``zoocompiler.cli.main(argv)`` in process (arguments ``str``-ed); returns (exit code, stdout, stderr)."""
    from zoocompiler import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


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
