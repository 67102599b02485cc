"""Keep the logging of torch and the ONNX libraries off the user's terminal, and keep what they said.

torch installs its own handlers (writing to stderr) on its loggers; a failed ``torch.export`` attempt that a
fallback then recovers from can log hundreds of lines of traceback. :func:`captured_logs` routes every record
of the named logger hierarchies into a list for the duration, then restores handlers and propagation; with
``warnings_too`` it also keeps the Python warnings shown meanwhile (e.g. the TorchScript tracer's ``TracerWarning``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

from .text import plain_text

LIBRARY_LOGGERS = ("torch", "onnxscript", "onnx_ir")


class _Capture(logging.Handler):
    """Collects formatted records as plain-text lines (ANSI codes removed)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.extend(plain_text(self.format(record), limit=20000).splitlines())
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is dropped, never raised
            pass


@contextmanager
def _shown_warnings(capture: _Capture) -> Iterator[None]:
    """Warnings that the active filters would show go to ``capture`` as ``WARNING py.warnings: ...`` lines."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # warnings.showwarning's signature
        text = f"{category.__name__}: {message} ({filename}:{lineno})"
        fields = {"name": "py.warnings", "levelno": logging.WARNING, "levelname": "WARNING", "msg": text}
        capture.emit(logging.makeLogRecord(fields))

    with warnings.catch_warnings():  # restores showwarning and the filters afterwards
        warnings.showwarning = show
        yield


@contextmanager
def captured_logs(roots: Sequence[str] = LIBRARY_LOGGERS, *, warnings_too: bool = False) -> Iterator[list[str]]:
    """While active, every record of the ``roots`` logger hierarchies goes to the yielded list (as plain-text
    lines) instead of any handler; each logger's handlers and propagation are restored afterwards. With
    ``warnings_too``, Python warnings that would be shown go to the list as well, in order."""
    capture = _Capture()
    names = {*roots, *(n for n in logging.root.manager.loggerDict if n.split(".")[0] in roots)}
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in map(logging.getLogger, names)]
    try:
        for lg, _, _ in saved:
            top = lg.name in roots
            lg.handlers = [capture] if top else []
            lg.propagate = not top
        with _shown_warnings(capture) if warnings_too else nullcontext():
            yield capture.lines
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate
