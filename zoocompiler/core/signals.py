"""SIGTERM handled like Ctrl-C: it unwinds the stack, so every ``finally`` and context manager cleans up.

``timeout``, ``kill``, job schedulers and CI cancellation send SIGTERM, whose default action ends the
process at once and leaves staging directories, half-written files and temporary directories behind.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM arrived. A ``BaseException`` like ``KeyboardInterrupt``: ``except Exception`` does not stop it."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (once: a second SIGTERM during the cleanup is
    ignored). Only the main thread can own signal handlers; elsewhere this does nothing. The previous
    handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
