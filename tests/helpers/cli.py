"""Command-line test helpers: the one-line error format and the sub-commands of a parser."""

from __future__ import annotations

import argparse


def assert_one_line_error(err: str, fragment: str) -> None:
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert fragment in err, err


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Sub-command name → its parser, for every sub-command ``parser`` declares."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found
