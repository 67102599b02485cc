"""Test executors: the in-process executor with items run in another order (results must not depend on it)."""

from __future__ import annotations

from pathlib import Path

from zoocompiler.pipelines.base import LocalExecutor


class ReversedExecutor(LocalExecutor):
    """Runs the items last to first (as a scheduler might), returns results in item order; counts ``map`` calls."""

    def __init__(self):
        self.calls = 0

    def map(self, fn, items):
        items = list(items)
        self.calls += 1
        return [fn(item) for item in reversed(items)][::-1]

    def map_writing(self, fn, items, folder):
        return self.map(lambda item: fn(item, Path(folder)), items)
