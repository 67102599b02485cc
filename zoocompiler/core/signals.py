"""Ctrl-C and SIGTERM unwind the stack, so every ``finally`` and context manager cleans up.

``timeout``, ``kill``, job schedulers and CI cancellation send SIGTERM, whose default action ends the
process at once and leaves staging directories, half-written files and temporary directories behind.
Within :func:`stop_signals_raise`, SIGTERM raises :class:`Terminated` and SIGINT raises
:class:`Interrupted`. ``Interrupted`` subclasses ``KeyboardInterrupt`` (every ``except
KeyboardInterrupt`` still sees it) but is not that exact type, which CPython would otherwise treat
as unhandled at exit and turn into a death by SIGINT even after the CLI has handled it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM arrived. A ``BaseException`` like ``KeyboardInterrupt``: ``except Exception`` does not stop it."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) arrived."""


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` and SIGINT :class:`Interrupted`, once each:
    a repeated signal during the cleanup is ignored. Only the main thread can own signal handlers;
    elsewhere this does nothing. The previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raiser(kind: type[BaseException]):
        def handler(signum, frame):
            signal.signal(signum, signal.SIG_IGN)  # let the cleanup finish
            raise kind(signum)

        return handler

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, raiser(Terminated)),
        signal.SIGINT: signal.signal(signal.SIGINT, raiser(Interrupted)),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
