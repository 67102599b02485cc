"""PNG plots of a reassembly: the zoo's CKA matrix with the equivalence sets, and the candidates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zoocompiler.core.plots import pyplot, save_png
from zoocompiler.solvers.partition import Partition

if TYPE_CHECKING:  # pragma: no cover
    from ..zoo.similarity import ZooSimilarity
    from .problem import Candidate


def position_sets(sim: ZooSimilarity, partition: Partition) -> np.ndarray:
    """Equivalence-set index of the block each global position ends (−1 for a model's input position)."""
    sets = np.full(sim.matrix.shape[0], -1)
    for i, (bounds, stage_sets) in enumerate(zip(partition.boundaries, partition.sets, strict=True)):
        offset = sim.models[i].offset
        for k, s in enumerate(stage_sets):
            sets[offset + bounds[k] + 1 : offset + bounds[k + 1] + 1] = s
    return sets


def plot_similarity(sim: ZooSimilarity, partition: Partition, path: Path) -> Path:
    """Heat map of the cut-point CKA matrix; model boundaries as lines, a strip coloured by equivalence set."""
    plt = pyplot()
    n = sim.matrix.shape[0]
    fig, (strip, ax) = plt.subplots(
        2, 1, figsize=(8, 8.6), gridspec_kw={"height_ratios": [1, 20], "hspace": 0.02}, sharex=True
    )
    im = ax.imshow(sim.matrix, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    sets = position_sets(sim, partition)
    strip.imshow(np.ma.masked_less(sets, 0)[None, :], cmap="tab10", vmin=0, vmax=9, aspect="auto")
    strip.set_yticks([])
    strip.set_title(f"linear CKA between cut points; strip: equivalence set of each block (K={partition.k})")
    starts = [m.offset for m in sim.models] + [n]
    for s in starts[1:-1]:
        for a in (ax, strip):
            a.axvline(s - 0.5, color="white", lw=0.8)
        ax.axhline(s - 0.5, color="white", lw=0.8)
    mids = [(a + b - 1) / 2 for a, b in zip(starts[:-1], starts[1:], strict=True)]
    names = [m.name for m in sim.models]
    ax.set_xticks(mids, names, rotation=45, ha="right")
    ax.set_yticks(mids, names)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return save_png(fig, path)


def plot_candidates(candidates: Sequence[Candidate], chosen: Candidate, proxy: str, path: Path) -> Path:
    """The re-rank proxy against MACs for every candidate (ILP assemblies and whole zoo models), the chosen one
    marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for source, colour, label in (("ilp", "tab:blue", "ILP top-M"), ("whole", "tab:green", "zoo model kept whole")):
        points = [c for c in candidates if c.source == source and np.isfinite(c.score(proxy))]
        ax.scatter([c.assembly.macs / 1e6 for c in points], [c.score(proxy) for c in points], c=colour, label=label)
    if np.isfinite(chosen.score(proxy)):
        ax.scatter([chosen.assembly.macs / 1e6], [chosen.score(proxy)], marker="*", s=260, c="tab:red", label="chosen")
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("held-out linear-probe accuracy" if proxy == "probe" else "NASWOT score (log det)")
    ax.set_title("reassembly candidates")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_baselines(report: dict, path: Path) -> Path:
    """Test accuracy of the chosen network, the best single zoo model and the from-scratch twin (before and after
    tuning), from an ``assemble`` report."""
    plt = pyplot()
    base = report["baselines"]
    rows = [("chosen", report["accuracy_before_tuning"], report["accuracy"])]
    if base["single"] is not None:
        rows.append((f"single: {base['single']['model']}", base["single"]["test_before"], base["single"]["test"]))
    rows.append(("from scratch", base["scratch"]["test_before"], base["scratch"]["test"]))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label="least-squares head", color="tab:gray")
    ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label=f"kept after {report['tune']} tuning", color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r[2], f"{r[2]:.1%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r[0] for r in rows])
    ax.set_ylabel(f"test accuracy ({report['task']['data']})")
    ax.set_ylim(0, 1.05)
    ax.set_title("assembly vs its baselines, same budget and tuning")
    ax.legend(loc="lower right")
    return save_png(fig, path)
