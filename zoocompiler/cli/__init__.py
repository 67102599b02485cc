"""``zoocompile``: the command line (argparse + rich).

Every command builds a JSON-able dict first and then either prints it (``--json``, nothing
else on stdout) or renders it as rich tables. Exit codes: 0 success, 1 internal error,
2 user error (any ``ZooError`` or a bad command line), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM). Ctrl-C and SIGTERM unwind the stack: staging directories, partial files and temporary
directories are removed before the exit.

Layout: this module holds :func:`main`, the top-level parser and the error handling;
``common`` the shared helpers; one module per command group (``inspect``: inspect, export;
``zoo``: zoo list/build; ``rewrite``: prune, fuse; ``assemble``: partition, assemble;
``slice``: slice train/export; ``modularize``: modularize train/extract/reuse; ``pack``: pack
slice/build/list; ``pool``: pool distill/finetune/build/list).

A command module has one entry point, ``register(commands) -> None``: ``commands`` is the
sub-parser set of ``zoocompile`` (``argparse`` ``add_subparsers``); ``register`` adds the
module's parser(s) with ``commands.add_parser(...)`` and gives every leaf parser, via
``set_defaults``, ``run(args) -> dict`` (does the work, returns JSON-able data) and
``render(console, data)`` (the rich tables). Command modules import only ``cli.common`` and
the library, never each other, and import torch and the heavy library modules inside
functions, so that ``zoocompile --help`` stays fast. Adding a command: a new module here and
its name in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from zoocompiler import __version__
from zoocompiler.core.errors import ZooError
from zoocompiler.core.signals import Terminated, stop_signals_raise

from .common import Parser, console, one_line, print_json

DEBUG_HELP = "show full tracebacks on errors (before or after the command)"
EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

# command modules of this package, in the order `zoocompile --help` lists their commands
COMMANDS = ("inspect", "zoo", "rewrite", "assemble", "slice", "modularize", "pack", "pool")


def build_parser() -> argparse.ArgumentParser:
    """The ``zoocompile`` argument parser (each subcommand sets ``run`` and ``render``)."""
    parser = Parser(
        prog="zoocompile",
        description="Compile model zoos: trace, analyse (cut points, unit groups), export to ONNX.",
        epilog="exit codes: 0 ok, 1 internal error, 2 user error (message names cause and fix), 130 interrupted, "
        "143 terminated",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:  # a name of this package's modules, or a full dotted module path
        importlib.import_module(name if "." in name else f"{__name__}.{name}").register(commands)
    _debug_everywhere(parser)
    return parser


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after a (sub)command too (``zoocompile inspect SPEC --debug``): every sub-parser gets it,
    with a ``SUPPRESS`` default so that a sub-parser never resets the top-level ``--debug`` to False."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in {id(p): p for p in action.choices.values()}.values():  # aliases share a parser
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
            _debug_everywhere(sub)


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--json``, anything a library prints goes to stderr so stdout stays pure JSON."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zoocompile`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help/--version (0) or a usage error (2)
        return int(exit_.code or 0)
    run: Callable[[argparse.Namespace], dict[str, Any]] = args.run
    as_json = getattr(args, "json", False)
    try:
        with stop_signals_raise(), _stdout_to_stderr(as_json):
            data = run(args)
        if as_json:
            print_json(data)
        else:
            args.render(console(), data)
        return EXIT_OK
    except ZooError as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("error: terminated (SIGTERM); partial output removed", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.debug:
            traceback.print_exc()
            print(f"error: internal error: {type(err).__name__}: {one_line(str(err))}", file=sys.stderr)
        else:
            print(
                f"error: internal error: {type(err).__name__}: {one_line(str(err))[:200]} (rerun with --debug)",
                file=sys.stderr,
            )
        return EXIT_INTERNAL
