"""The PNG of ``pool``: test accuracy against parameters for every descendant, one series per method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zoocompiler.core.budget import Budget
from zoocompiler.core.plots import pyplot, save_png

MARKERS = ("o-", "s--", "^:", "D-.", "v-", "x--")


def plot_descendants(series: Mapping[str, Sequence[dict[str, Any]]], path: Path, *,
                     chosen: dict[str, Any] | None = None, budget: Budget | None = None,
                     anchors: Mapping[str, tuple[int, float]] | None = None, title: str = "descendants") -> Path:
    """Accuracy (%) against params, a line per series (rows with ``params``, ``accuracy``, ``low``, ``high``);
    the ``chosen`` descendant ringed, a params budget as a vertical line, ``anchors`` (name → (params,
    accuracy)) as stars."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    for (name, rows), style in zip(series.items(), MARKERS * 4, strict=False):
        rows = sorted(rows, key=lambda r: r["params"])
        ax.plot([r["params"] / 1e6 for r in rows], [100 * r["accuracy"] for r in rows], style, label=name,
                markersize=4)
    if chosen is not None:
        ax.plot([chosen["params"] / 1e6], [100 * chosen["accuracy"]], "o", markersize=12, markerfacecolor="none",
                markeredgecolor="red", label=f"chosen (low={chosen['low']}, high={chosen['high']})")
    if budget is not None and budget.params is not None:
        ax.axvline(budget.params / 1e6, color="red", linestyle=":", label="params budget")
    for name, (params, accuracy) in (anchors or {}).items():
        ax.plot([params / 1e6], [100 * accuracy], "*", markersize=10, label=name)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, path)
