"""Budgets on an emitted model (params, MACs, latency) and the ``params=1.5M,flops=60M,latency=2ms`` grammar."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import ZooError

METRICS = ("params", "macs", "latency_ms")
METRIC_LABEL = {"params": "params", "macs": "flops", "latency_ms": "latency"}  # as in the budget grammar
BUDGET_TOLERANCE = 1e-9  # relative slack for float summation order when re-checking budgets
_GRAMMAR = (
    "write comma-separated key=value items with keys params, flops (alias macs), latency, "
    "e.g. 'params=1.5M,flops=60M,latency=2ms' (suffixes k/K, M, G; latency in ms or s, default ms; values > 0)"
)
_ITEM = re.compile(r"^\s*([A-Za-z_]+)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_COUNT_SUFFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
_TIME_SUFFIX = {"": 1.0, "ms": 1.0, "s": 1e3}
METRIC_KEY = {"params": "params", "macs": "macs", "flops": "macs", "latency": "latency_ms", "latency_ms": "latency_ms"}


@dataclass(frozen=True)
class Budget:
    """Upper bounds on the assembled model; ``None`` = unconstrained.

    ``macs`` counts multiply-accumulates, which is what the paper (and the ``flops=`` budget key)
    calls FLOPs.
    """

    params: float | None = None
    macs: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        for metric in METRICS:
            value = getattr(self, metric)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ZooError(f"budget {METRIC_LABEL[metric]}={value} is not a positive number", _GRAMMAR)

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``"params=1.5M,flops=60M,latency=2ms"``.

        Keys: ``params``; ``flops`` or its alias ``macs`` (multiply-accumulates, the paper's FLOPs);
        ``latency``. Count suffixes k/K (1e3), M (1e6), G (1e9); latency units ms or s (default ms).
        Unknown keys, repeated keys, malformed or non-positive numbers raise ``ZooError``.
        """
        values: dict[str, float] = {}
        items = text.split(",") if text.strip() else []
        if not items:
            raise ZooError("empty budget", _GRAMMAR)
        for item in items:
            match = _ITEM.match(item)
            if match is None:
                raise ZooError(f"cannot read budget item {item.strip()!r}", _GRAMMAR)
            key, number, unit = match.groups()
            metric = METRIC_KEY.get(key.lower())
            if metric is None:
                raise ZooError(f"unknown budget key {key!r}", _GRAMMAR)
            if metric in values:
                raise ZooError(f"budget key {key!r} given twice (flops and macs are the same key)", _GRAMMAR)
            scales = _TIME_SUFFIX if metric == "latency_ms" else _COUNT_SUFFIX
            if unit not in scales:
                raise ZooError(f"unknown unit {unit!r} in budget item {item.strip()!r}", _GRAMMAR)
            values[metric] = float(number) * scales[unit]
        return cls(**values)

    def to_dict(self) -> dict:
        """The given bounds only, keyed params / macs / latency_ms."""
        return {m: getattr(self, m) for m in METRICS if getattr(self, m) is not None}

    def __str__(self) -> str:
        return ",".join(f"{METRIC_LABEL[m]}={human_metric(v, m)}" for m, v in self.to_dict().items()) or "unconstrained"


def human_metric(value: float, metric: str, round_up: bool = False) -> str:
    """``1234567`` → ``1.23M`` (``1.24M`` rounded up); latency in ms, e.g. ``2.31ms``. Three significant digits
    when rounding up, six otherwise."""
    if metric == "latency_ms":
        scale, suffix = 1.0, "ms"
    else:
        scale, suffix = next(((s, x) for s, x in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if value >= s), (1.0, ""))
    mantissa = value / scale
    if round_up and mantissa > 0:
        digits = max(0, 2 - math.floor(math.log10(mantissa)))
        mantissa = math.ceil(mantissa * 10**digits - 1e-9) / 10**digits
        text = f"{mantissa:.{digits}f}"
        return (text.rstrip("0").rstrip(".") if "." in text else text) + suffix
    return f"{mantissa:.6g}{suffix}"
