"""Slice rates are fractions j/G stored as floats: one tolerance decides when two are the same."""

from __future__ import annotations

RATE_TOLERANCE = 1e-9  # two rates closer than this are the same rate
DEFAULT_GROUPS = 16  # slice rates are multiples of 1/DEFAULT_GROUPS unless a model says otherwise


def same_rate(a: float, b: float) -> bool:
    """True when ``a`` and ``b`` denote the same slice rate."""
    return abs(a - b) <= RATE_TOLERANCE
