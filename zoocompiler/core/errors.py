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


class TrainingError(ZooError):
    """Training diverged or a model computes non-finite values: a NaN/inf loss, weights or outputs
    (usually a learning rate that is too high, or NaN/inf values in the data)."""


class PassError(ZooError):
    """An analysis or rewrite pass was given a graph it cannot handle."""


class SolverError(ZooError):
    """A partition or assembly problem with no solution (infeasible budget, too few cut points)."""


class BudgetError(ZooError):
    """A budget (MACs, latency) that no available option meets."""


class InfeasibleBudgetError(SolverError):
    """No assembly fits the budget; ``minimum`` holds the cheapest total per metric (each on its own)."""

    def __init__(self, cause: str, fix: str, *, budget: object, minimum: dict[str, float]):
        self.budget = budget
        self.minimum = minimum
        super().__init__(cause, fix)


class LatencyBudgetError(BudgetError):
    """No slice rate processes a batch within the latency budget; ``needed_s`` is the smallest budget that works."""

    def __init__(self, cause: str, fix: str, *, needed_s: float, max_samples: int):
        self.needed_s = needed_s
        self.max_samples = max_samples
        super().__init__(cause, fix)


class UnknownRateError(ZooError):
    """A slice rate for which no model was loaded."""
