"""Linear CKA: equality with the textbook formulas, invariances, biased vs unbiased, the batched matrix."""

from __future__ import annotations

import numpy as np
import pytest

from zoocompiler.core.errors import SolverError
from zoocompiler.solvers.cka import centered_gram, cka_matrix, linear_cka


def _naive_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 - the paper's name
    """Biased HSIC, Gretton et al.: tr(K H L H) / (n - 1)²."""
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def _naive_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Unbiased HSIC, Song et al. 2012, eq. (5), written out term by term."""
    n = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    value = np.trace(kt @ lt)
    value += (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    value -= 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float(value) / (n * (n - 3))


def _naive_cka(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    hsic = _naive_unbiased_hsic if unbiased else _naive_hsic
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _related_pair(seed: int, n: int = 40, dx: int = 6, dy: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dx)) + rng.normal(size=dx)  # non-zero means: centring must matter
    y = np.tanh(x @ rng.normal(size=(dx, dy))) + 0.5 * rng.normal(size=(n, dy))
    return x, y


def test_centered_gram_is_hkh():
    x, _ = _related_pair(0)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    np.testing.assert_allclose(centered_gram(x), h @ (x @ x.T) @ h, atol=1e-10)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_linear_cka_equals_naive_formula(seed, unbiased):
    x, y = _related_pair(seed)
    assert linear_cka(x, y, unbiased=unbiased) == pytest.approx(_naive_cka(x, y, unbiased), abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_invariances(unbiased):
    x, y = _related_pair(1, dx=8)
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    base = linear_cka(x, y, unbiased=unbiased)
    assert linear_cka(x @ q, y, unbiased=unbiased) == pytest.approx(base, abs=1e-12)  # orthogonal transform
    assert linear_cka(3.7 * x, 0.01 * y, unbiased=unbiased) == pytest.approx(base, abs=1e-12)  # isotropic scaling
    assert linear_cka(x + 5.0, y, unbiased=unbiased) == pytest.approx(base, abs=1e-12)  # feature offsets
    assert linear_cka(x, x, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(y, x, unbiased=unbiased) == pytest.approx(base, abs=1e-15)  # symmetric
    # ... but not invariant to anisotropic scaling
    assert abs(linear_cka(x * np.arange(1, 9), y, unbiased=unbiased) - base) > 1e-3


def test_unbiased_is_near_zero_for_independent_features_while_biased_is_positive():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1000, 50)), rng.normal(size=(1000, 50))
    biased, unbiased = linear_cka(x, y), linear_cka(x, y, unbiased=True)
    assert biased > 0.03  # the biased estimator's positive offset ~ d / n
    assert abs(unbiased) < 0.005
    related_x, related_y = _related_pair(2)
    assert linear_cka(related_x, related_y) != pytest.approx(linear_cka(related_x, related_y, unbiased=True), abs=1e-3)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matrix_equals_pairwise(unbiased):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(30, 5))
    features = [base, base @ rng.normal(size=(5, 12)), np.maximum(base, 0), rng.normal(size=(30, 3)), base[:, :1]]
    m = cka_matrix(features, unbiased=unbiased)
    assert m.shape == (5, 5) and m.dtype == np.float64
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(np.diag(m), np.ones(5))
    for i in range(5):
        for j in range(5):
            if i != j:
                assert m[i, j] == pytest.approx(linear_cka(features[i], features[j], unbiased=unbiased), abs=1e-12)
    if not unbiased:
        assert m.min() >= 0.0 and m.max() <= 1.0


@pytest.mark.parametrize("unbiased", [False, True])
def test_constant_features_give_zero_never_nan(unbiased):
    x, _ = _related_pair(4, n=20)
    constant = np.full((20, 3), 2.5)
    assert linear_cka(constant, x, unbiased=unbiased) == 0.0
    assert linear_cka(constant, constant, unbiased=unbiased) == 0.0
    assert linear_cka(np.zeros((20, 2)), x, unbiased=unbiased) == 0.0
    m = cka_matrix([x, constant, x], unbiased=unbiased)
    assert not np.isnan(m).any()
    np.testing.assert_array_equal(m[1], [0.0, 1.0, 0.0])
    assert m[0, 2] == pytest.approx(1.0, abs=1e-12)


def test_errors():
    x, y = _related_pair(5, n=10)
    with pytest.raises(SolverError, match="n >= 4"):
        linear_cka(x[:3], y[:3], unbiased=True)
    with pytest.raises(SolverError, match="samples"):
        linear_cka(x, y[:8])
    with pytest.raises(SolverError, match="same probe samples"):
        cka_matrix([x, y[:8]])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(SolverError, match="NaN"):
        cka_matrix([x, bad])
    with pytest.raises(SolverError, match="2-d"):
        linear_cka(np.zeros((4, 2, 2)), x[:4])
    with pytest.raises(SolverError, match="at least one"):
        cka_matrix([])
    assert linear_cka(x[:, 0], x[:, :1]) == pytest.approx(1.0)  # 1-d input is one feature
