"""User-facing errors: each names the cause and the fix in one line.

The CLI prints ``error: <message>`` and exits non-zero for any ``ZooError``;
a traceback is shown only with ``--debug``. Library callers catch the class
that fits (all derive from ``ZooError``).
"""

from __future__ import annotations


class ZooError(Exception):
    """Base class: ``str(err)`` is a single line naming cause and fix."""

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} — {fix}" if fix else cause)


class UnknownModelError(ZooError):
    """A model spec that no source can resolve."""


class CheckpointError(ZooError):
    """A checkpoint that is corrupted, unsafe, or does not match the architecture."""


class TraceError(ZooError):
    """A model that cannot be traced to an fx graph."""


class InputShapeError(ZooError):
    """An input whose shape or dtype the model (or block) does not accept."""


class DataError(ZooError):
    """An unknown, missing or malformed dataset."""


class ExportError(ZooError):
    """ONNX export failed or the exported model does not match PyTorch."""


class PassError(ZooError):
    """An analysis or rewrite pass was given a graph it cannot handle."""


class SolverError(ZooError):
    """A partition or assembly problem with no solution (infeasible budget, too few cut points)."""


class BudgetError(ZooError):
    """A budget (MACs, latency) that no available option meets."""
