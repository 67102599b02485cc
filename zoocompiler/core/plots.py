"""Headless matplotlib for the pipelines' PNG plots: the Agg backend and an atomic PNG write."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG (all or nothing) and close it; returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path
