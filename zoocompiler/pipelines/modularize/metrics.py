"""Modularity metrics of MwT (paper 004, Eqs. 1–3) on kernel sets, and module masks by threshold (§3.3).

Kernel sets are boolean arrays ``[samples, kernels]`` (a kernel is in a sample's set when its mask is
> 0, or, for a standard model, when its output has a non-zero element). numpy only.

* Jaccard index ``|A ∩ B| / |A ∪ B|``; two empty sets give 0 (no shared kernel; sklearn's default).
* cohesion of a class: the mean Jaccard index over all pairs of its samples' sets (Eq. 2);
* coupling of two modules: the Jaccard index of their kernel sets (Eq. 3); of a model: the mean over
  all pairs of modules;
* :func:`batch_metrics`: Fig. 5's per-iteration values: classes with ≥ 2 samples in the batch for
  cohesion, module sets = the union of the batch's sample sets per class (no threshold) for coupling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def jaccard_matrix(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Pairwise Jaccard indices between the rows of boolean ``a`` ``[n, K]`` and ``b`` ``[m, K]`` (default ``a``)."""
    a = np.asarray(a, dtype=bool)
    b = a if b is None else np.asarray(b, dtype=bool)
    af, bf = a.astype(np.float64), b.astype(np.float64)
    inter = af @ bf.T
    union = af.sum(1)[:, None] + bf.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Eq. 1 for two boolean kernel sets."""
    return float(jaccard_matrix(np.asarray(a)[None], np.asarray(b)[None])[0, 0])


def cohesion(sets: np.ndarray) -> float:
    """Eq. 2: mean Jaccard index over the pairs of rows of ``sets`` (NaN below 2 rows)."""
    n = len(sets)
    if n < 2:
        return float("nan")
    jm = jaccard_matrix(sets)
    return float((jm.sum() - np.trace(jm)) / (n * (n - 1)))


def coupling(modules: np.ndarray) -> float:
    """Eq. 3 averaged: mean Jaccard index over the pairs of module sets (NaN below 2 modules)."""
    return cohesion(modules)


def batch_metrics(sets: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(cohesion, coupling, kernel rate) of one batch: cohesion averaged over classes with ≥ 2 samples,
    coupling over the classes present (module sets = unions within the batch), kernel rate = mean
    fraction of kernels in a sample's set."""
    sets = np.asarray(sets, dtype=bool)
    classes = np.unique(labels)
    coh = [cohesion(sets[labels == c]) for c in classes if (labels == c).sum() >= 2]
    unions = np.stack([sets[labels == c].any(0) for c in classes])
    return (float(np.mean(coh)) if coh else float("nan"), coupling(unions), float(sets.mean()))


@dataclass
class EpochModularity:
    """Running means of :func:`batch_metrics` over an epoch's batches."""

    sums: np.ndarray = field(default_factory=lambda: np.zeros(3))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def add(self, sets: np.ndarray, labels: np.ndarray) -> None:
        values = np.array(batch_metrics(sets, labels))
        ok = np.isfinite(values)
        self.sums[ok] += values[ok]
        self.counts[ok] += 1

    def means(self) -> dict[str, float]:
        m = np.divide(self.sums, self.counts, out=np.full(3, np.nan), where=self.counts > 0)
        return {"cohesion": float(m[0]), "coupling": float(m[1]), "kernel_rate": float(m[2])}


@dataclass
class ModuleMasks:
    """Per-class module masks ``[classes, kernels]`` (bool) and, per class, the layers whose threshold
    had to be lowered (point index → threshold used) because no kernel passed it."""

    masks: np.ndarray
    threshold: float
    lowered: dict[int, dict[int, float]] = field(default_factory=dict)
    freq: np.ndarray | None = None  # [classes, kernels]: fraction of the class's samples using the kernel
    mean: np.ndarray | None = None  # [classes, kernels]: the class's mean mask value per kernel
    totals: np.ndarray | None = None  # [classes]: training samples per class

    def union(self, classes: Sequence[int]) -> np.ndarray:
        """The mixed module of ``classes``: the union of their kernel sets."""
        return self.masks[list(classes)].any(0)

    def scores(self, classes: Sequence[int]) -> np.ndarray | None:
        """Per kernel, the highest usage frequency over ``classes`` (which extra kernels rounding adds first)."""
        return None if self.freq is None else self.freq[list(classes)].max(0)

    def scale(self, classes: Sequence[int]) -> np.ndarray | None:
        """Per kernel, the mean mask value over the training samples of ``classes`` (``calibrated`` modules)."""
        if self.mean is None or self.totals is None:
            return None
        weights = self.totals[list(classes)].astype(np.float64)
        return (self.mean[list(classes)] * weights[:, None]).sum(0) / max(weights.sum(), 1.0)


LOWER_STEP = 0.05  # the reference code's rule for an empty layer: lower τ by this much for that layer


def module_masks(counts: np.ndarray, totals: np.ndarray, threshold: float,
                 offsets: Sequence[tuple[int, int]]) -> ModuleMasks:
    """Module masks from ``counts[c, k]`` (samples of class ``c`` whose set holds kernel ``k``) and
    ``totals[c]`` (samples of class ``c``): kernel ``k`` is in module ``c`` when ``counts/totals > τ``.
    A layer (``offsets`` ranges) left empty gets τ lowered by 0.05 until a kernel passes (the rule of
    the reference code), recorded in ``lowered``; a layer no sample of the class uses keeps its first kernel
    (a module needs one per layer), recorded as τ 0."""
    freq = counts / np.maximum(totals, 1)[:, None]
    masks = freq > threshold
    lowered: dict[int, dict[int, float]] = {}
    for c in range(len(freq)):
        for i, (a, b) in enumerate(offsets):
            tau = threshold
            while not masks[c, a:b].any():
                tau = round(tau - LOWER_STEP, 10)
                if tau < 0:  # no sample of the class uses the layer: keep its first kernel only
                    masks[c, a] = True
                    lowered.setdefault(c, {})[i] = 0.0
                    break
                masks[c, a:b] = freq[c, a:b] > tau
                lowered.setdefault(c, {})[i] = tau
    return ModuleMasks(masks, threshold, lowered, freq)


def module_table(masks: np.ndarray, sets_by_class: Sequence[np.ndarray]) -> dict[str, object]:
    """Table 2's module columns: per module KRR and cohesion (Eq. 2 on its class's sample sets restricted
    to the module's kernels) and mean coupling to the others; plus their averages and the overlap matrix."""
    krr = masks.mean(1)
    coh = np.array([cohesion(s & m) for s, m in zip(sets_by_class, masks, strict=True)])
    overlap = jaccard_matrix(masks)
    n = len(masks)
    per_coupling = (overlap.sum(1) - np.diag(overlap)) / max(n - 1, 1)
    return {
        "krr": float(krr.mean()),
        "cohesion": float(np.nanmean(coh)),
        "coupling": coupling(masks),
        "per_module": [{"class": c, "krr": float(krr[c]), "cohesion": float(coh[c]), "coupling": float(per_coupling[c]),
                        "kernels": int(masks[c].sum())} for c in range(n)],
        "overlap": overlap.tolist(),
    }
