"""NASWOT's score on plain data (Mellor et al. 2021, DeRy §3.3): binary codes → Hamming kernel → log|det|.

Each sample of a batch gets a binary code: the sign pattern (x > 0) of every activation's input, i.e. of
its pre-activation. For ReLU-like activations the sign of the input is exactly which linear region the
sample lies in (and equals ``output > 0`` for ReLU/ReLU6); for smooth activations (GELU, SiLU, ...) it is
the same sign pattern, as NASWOT's own hooks read the ReLU *input*. The kernel
``K_H[i, j] = D − Hamming(c_i, c_j)`` counts agreeing bits and the score is ``log|det K_H|``: the more
distinct the codes of a batch, the larger the score. A batch with two identical codes gives a singular
kernel and the score ``-inf``.

The codes come from :mod:`zoocompiler.passes.analysis.preactivations` (which runs a model and
reports its pre-activations); :func:`zoocompiler.pipelines.assemble.naswot.naswot` joins the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..core.errors import SolverError

_CHUNK = 1 << 20  # feature columns per kernel matmul: bounds the float32 copy of a large activation


def hamming_kernel(codes: np.ndarray) -> np.ndarray:
    """``K_H[i, j] = D − Hamming(codes[i], codes[j])`` for (N, D) codes of 0/1 or bool, as float64."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, D), got shape {codes.shape}")
    if codes.dtype != np.bool_ and not np.isin(codes, (0, 1)).all():
        raise ValueError("codes must hold only 0 and 1")
    return _agreement(torch.from_numpy(codes.astype(np.bool_))).numpy()


def naswot_score(codes: np.ndarray) -> float:
    """``log|det K_H|`` of the codes' Hamming kernel; ``-inf`` when it is singular (e.g. two equal codes)."""
    return _log_det(torch.from_numpy(hamming_kernel(codes)))


def binary_codes(activations: Sequence[torch.Tensor]) -> np.ndarray:
    """Per-sample sign codes: each (N, ...) tensor becomes (x > 0) flattened, concatenated along features."""
    if not activations:
        raise ValueError("no activations to encode")
    batch = {a.shape[0] for a in activations}
    if len(batch) != 1:
        raise ValueError(f"activations disagree on the batch size: {sorted(batch)}")
    return torch.cat([(a.detach() > 0).flatten(1) for a in activations], dim=1).cpu().numpy()


class NaswotKernel:
    """``K_H`` of one batch of ``n`` samples, accumulated block by block of (n, D) sign bits."""

    def __init__(self, n: int):
        self.kernel = torch.zeros(n, n, dtype=torch.float64)

    def add(self, bits: torch.Tensor) -> None:
        """Add the agreement counts of one (n, D) bool block (e.g. ``x > 0`` of one pre-activation)."""
        self.kernel += _agreement(bits.cpu())

    def score(self) -> float:
        """``log|det K_H|``; ``-inf`` when singular."""
        return _log_det(self.kernel)


def mean_score(scores: Iterable[float]) -> float:
    """The mean of per-batch scores (the paper: 5 batches of 32); ``-inf`` if any batch is."""
    scores = list(scores)
    if not scores:
        raise SolverError("naswot got no batches", "pass at least one batch of inputs (the paper uses 5 of 32)")
    return float(np.mean(scores))


def _agreement(bits: torch.Tensor) -> torch.Tensor:
    """Number of agreeing bits between rows of a bool (N, D) tensor, float64 (N, N).

    With signs s = ±1, s·sᵀ = agree − disagree, so agree = (s·sᵀ + D) / 2. The matmul runs in float32 on
    column chunks of at most 2^20: every partial sum is an integer below 2^24, hence exact.
    """
    n, d = bits.shape
    total = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, d, _CHUNK):
        signs = bits[:, start : start + _CHUNK].to(torch.float32) * 2 - 1
        total += (signs @ signs.T).to(torch.float64)
    return (total + d) / 2


def _log_det(kernel: torch.Tensor) -> float:
    """log|det| of a PSD integer kernel; -inf when rank-deficient (slogdet alone can miss exact singularity)."""
    if torch.linalg.matrix_rank(kernel) < kernel.shape[0]:
        return float("-inf")
    return float(torch.linalg.slogdet(kernel).logabsdet)
