"""Linear centered kernel alignment (CKA) between representations given as (samples × features) arrays.

Biased CKA is Kornblith et al. (2019): ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with linear Grams
``K = X Xᵀ`` centred by ``H = I - 11ᵀ/n``; it lies in [0, 1]. Unbiased CKA replaces HSIC by the
U-statistic of Song et al. (2012), as in Nguyen et al. (2021, "minibatch CKA"); it needs n ≥ 4, lies in
[-1, 1] and is ~0 for independent representations. Both are the cosine between transformed Grams, so a
whole similarity matrix is one matrix product of the flattened Grams.

Convention: a representation with zero variance (every feature constant over the samples, up to a
relative spread of ``CONSTANT_RTOL``) has CKA 0 with everything, itself included, in ``linear_cka``;
``cka_matrix`` still puts 1 on its diagonal. NaN never appears; non-finite inputs raise ``SolverError``.

Hand-written (about 40 lines of numpy) because no installed library computes CKA; the formulas follow
the reference colab of Kornblith et al.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.errors import SolverError

CONSTANT_RTOL = 1e-12


def _features(x: np.ndarray, what: str = "features") -> np.ndarray:
    """``x`` as a finite float64 (n, d) array (1-d input is one feature)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise SolverError(f"{what} have shape {a.shape}", "pass a 2-d (samples × features) array")
    if a.shape[0] < 2:
        raise SolverError(f"{what} have {a.shape[0]} sample(s)", "CKA needs at least 2 samples (4 when unbiased)")
    if not np.all(np.isfinite(a)):
        raise SolverError(f"{what} contain NaN or inf", "check the model and the probe data (e.g. normalisation)")
    return a


def _centred(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """Column-centred ``x`` and whether it is constant (relative spread below ``CONSTANT_RTOL``)."""
    xc = x - x.mean(axis=0, keepdims=True)
    scale = float(np.max(np.abs(x))) if x.size else 0.0
    constant = scale == 0.0 or float(np.max(np.abs(xc))) <= CONSTANT_RTOL * scale
    return xc, constant


def centered_gram(x: np.ndarray) -> np.ndarray:
    """``H (X Xᵀ) H`` for the (n, d) features ``x``, computed as ``Xc Xcᵀ`` with column-centred ``Xc``."""
    xc, _ = _centred(_features(x))
    return xc @ xc.T


def _unbiased_transform(gram: np.ndarray) -> np.ndarray:
    """Gram ``U(K)`` with ``<U(K), U(L)>_F = n (n - 3) HSIC_u(K, L)`` (Song et al. 2012); modifies ``gram``."""
    n = gram.shape[0]
    np.fill_diagonal(gram, 0.0)
    means = gram.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    np.fill_diagonal(gram, 0.0)
    return gram


def _transformed_gram(x: np.ndarray, unbiased: bool, what: str) -> tuple[np.ndarray, bool]:
    """The Gram whose Frobenius cosine with another is the CKA, and whether ``x`` is constant."""
    a = _features(x, what)
    if unbiased and a.shape[0] < 4:
        raise SolverError(f"unbiased CKA needs n >= 4 samples, {what} have {a.shape[0]}", "use more probe samples")
    xc, constant = _centred(a)
    gram = xc @ xc.T
    return (_unbiased_transform(gram) if unbiased else gram), constant


def _packed(gram: np.ndarray) -> np.ndarray:
    """Upper triangle of a symmetric matrix, off-diagonal entries × √2, so ``packed(A)·packed(B) = <A, B>_F``."""
    rows, cols = np.triu_indices(gram.shape[0])
    return gram[rows, cols] * np.where(rows == cols, 1.0, np.sqrt(2.0))


def _cosine_matrix(vectors: np.ndarray, constant: np.ndarray, unbiased: bool) -> np.ndarray:
    """Pairwise cosines of the rows of ``vectors``; rows flagged ``constant`` (or of norm 0) give 0."""
    inner = vectors @ vectors.T
    inner = (inner + inner.T) / 2
    norms = np.sqrt(np.clip(np.diag(inner), 0.0, None))
    degenerate = constant | (norms == 0.0)
    safe = np.where(degenerate, 1.0, norms)
    cka = inner / np.outer(safe, safe)
    cka[degenerate, :] = 0.0
    cka[:, degenerate] = 0.0
    return np.clip(cka, -1.0 if unbiased else 0.0, 1.0)


def linear_cka(x: np.ndarray, y: np.ndarray, *, unbiased: bool = False) -> float:
    """Linear CKA between the (n, d1) and (n, d2) representations ``x`` and ``y`` of the same n samples.

    Zero-variance input → 0. Raises ``SolverError`` for mismatched sample counts, non-finite values,
    n < 2, or n < 4 with ``unbiased``.
    """
    gx, cx = _transformed_gram(x, unbiased, "x")
    gy, cy = _transformed_gram(y, unbiased, "y")
    if gx.shape != gy.shape:
        raise SolverError(
            f"x has {gx.shape[0]} samples but y has {gy.shape[0]}", "compute both on the same probe samples"
        )
    vectors = np.stack([gx.ravel(), gy.ravel()])
    return float(_cosine_matrix(vectors, np.array([cx, cy]), unbiased)[0, 1])


def packed_gram(x: np.ndarray, *, unbiased: bool = False, what: str = "features") -> tuple[np.ndarray, bool]:
    """One representation's share of a CKA matrix: its transformed Gram, packed (n(n+1)/2 values), and
    whether it is constant. Lets callers drop each (n, d) feature array as soon as its Gram is taken."""
    gram, constant = _transformed_gram(x, unbiased, what)
    return _packed(gram), constant


def cka_from_packed(packed: Sequence[tuple[np.ndarray, bool]], *, unbiased: bool = False) -> np.ndarray:
    """The CKA matrix of representations given as ``packed_gram`` results (same ``unbiased`` flag)."""
    if len(packed) == 0:
        raise SolverError("no representations given", "pass at least one (samples × features) array")
    sizes = {len(vector) for vector, _ in packed}
    if len(sizes) != 1:
        raise SolverError(
            "representations have different sample counts", "compute every representation on the same probe samples"
        )
    cka = _cosine_matrix(np.stack([v for v, _ in packed]), np.array([c for _, c in packed]), unbiased)
    np.fill_diagonal(cka, 1.0)
    return cka


def cka_matrix(features: Sequence[np.ndarray], *, unbiased: bool = False) -> np.ndarray:
    """P×P float64 matrix of linear CKA between every pair of the P representations (same n samples each).

    Symmetric with a diagonal of exactly 1; off-diagonal entries equal ``linear_cka``. Each Gram is
    computed once and all inner products come from one matrix product; memory is about P · n² / 2 floats.
    """
    return cka_from_packed(
        [packed_gram(x, unbiased=unbiased, what=f"representation {p}") for p, x in enumerate(features)],
        unbiased=unbiased,
    )
