"""The PNGs of ``modularize``: the per-epoch curves of Fig. 5 and the module-overlap matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoocompiler.core.plots import pyplot, save_png

CURVES = (("coupling", "coupling"), ("cohesion", "cohesion"), ("kernel_rate", "kernels used per sample"),
          ("accuracy", "test accuracy"))


def plot_training(record: dict[str, Any], path: Path) -> Path:
    """Coupling, cohesion, kernel rate and test accuracy per epoch: modular (solid) vs standard (dashed)."""
    fig, axes = pyplot().subplots(2, 2, figsize=(8, 5.5))
    for ax, (key, label) in zip(axes.flat, CURVES, strict=True):
        for run, style in (("modular", "o-"), ("standard", "s--")):
            if record.get(run):
                rows = record[run]["history"]
                ax.plot([r["epoch"] for r in rows], [r.get(key) for r in rows], style, label=run, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
    axes.flat[0].legend()
    fig.suptitle(f"{record['config']['spec']} on {record['config']['data']}")
    fig.tight_layout()
    return save_png(fig, path)


def plot_overlap(overlap: list[list[float]], labels: list[str], path: Path, title: str) -> Path:
    """The Jaccard index between every pair of modules' kernel sets (Eq. 3) as a heatmap."""
    fig, ax = pyplot().subplots(figsize=(5.2, 4.5))
    image = ax.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(overlap):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(image, ax=ax, label="Jaccard index")
    ax.set_title(title)
    return save_png(fig, path)
