"""Model slicing rates: valid rates, snapping, CLI parsing and the training-time rate schedulers.

Paper: Model Slicing, §3.1 (Eq. 3), §3.5.2 (Eq. 10), §5.1. With GroupNorm of ``G`` groups the valid slice rates
are the multiples of ``1/G``: ``r = j/G`` for ``j = 1..G``. Rates are plain floats ``j / G`` (the nearest float
to the fraction); compare them with ``core.rates.same_rate`` (tolerance ``RATE_TOLERANCE``) or as integers
``j = round(r * G)``.

A scheduler gives, at each point of training (``progress`` = step / total_steps in [0, 1]), a categorical
distribution over the valid rates in ``[lb, 1]`` and draws one rate per batch from it (Eq. 10). The sandwich rule
(Slimmable / universally slimmable networks, not in paper 003) instead trains several rates on every batch:
:meth:`SandwichScheduler.step_rates`. Everything here
is plain math (numpy, scipy.stats); it takes numbers, never modules, so it is testable alone.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol, runtime_checkable

import numpy as np
from scipy import stats

from ..core.errors import ZooError
from ..core.rates import RATE_TOLERANCE, same_rate

SCHEDULERS: tuple[str, ...] = ("normal", "uniform", "progressive-dynamic", "progressive-static", "sandwich")
DISTRIBUTIONS: tuple[str, ...] = ("normal", "uniform")

# ----------------------------------------------------------------------------------------------------------------
# Valid rates


def _check_groups(groups: int) -> int:
    """``groups`` as an int >= 1 (bools and non-integers rejected)."""
    if isinstance(groups, bool):
        raise ZooError(f"groups must be an integer >= 1, got {groups!r}", "pass the GroupNorm group count, e.g. 16")
    try:
        value = operator.index(groups)
    except TypeError:
        raise ZooError(
            f"groups must be an integer >= 1, got {groups!r}", "pass the GroupNorm group count, e.g. 16"
        ) from None
    if value < 1:
        raise ZooError(f"groups must be an integer >= 1, got {value}", "pass the GroupNorm group count, e.g. 16")
    return value


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_unit_interval(value: float, what: str, fix: str) -> float:
    """``value`` as a float in (0, 1]; NaN, infinities, 0 and negatives raise ``ZooError``."""
    if not _is_number(value) or not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ZooError(f"{what} {value!r} is not in (0, 1]", fix)
    return float(value)


def _check_lb(lb: float) -> float:
    return _check_unit_interval(lb, "lower bound", "use a lower bound lb with 0 < lb <= 1, e.g. --lb 0.375")


def _rate_text(r: float) -> str:
    return f"{r:g}"


def valid_rates(groups: int, lb: float | None = None) -> list[float]:
    """The valid slice rates ``[j/G for j in 1..G]``, ascending, restricted to ``r >= lb`` when ``lb`` is given.

    ``lb`` must be in (0, 1]. A ``lb`` that is not a multiple of ``1/G`` is rounded *up* to the next valid rate
    (so ``lb=0.3, G=16`` gives rates from 5/16 = 0.3125); the first returned rate is the effective lower bound.
    """
    g = _check_groups(groups)
    first = 1
    if lb is not None:
        first = max(1, math.ceil(_check_lb(lb) * g - RATE_TOLERANCE))
    return [j / g for j in range(first, g + 1)]


def snap_rate(r: float, groups: int) -> float:
    """The valid rate nearest to ``r`` (ties go up; rates below ``1/(2G)`` snap to ``1/G``). ``r`` must be in (0, 1]."""
    g = _check_groups(groups)
    r = _check_unit_interval(r, "slice rate", "use a slice rate r with 0 < r <= 1, e.g. 0.5")
    j = math.floor(r * g + 0.5 + RATE_TOLERANCE)
    return min(max(j, 1), g) / g


def check_rate(r: float, groups: int, lb: float | None = None) -> float:
    """``snap_rate(r, groups)``, raising ``ZooError`` when the snapped rate is below the (rounded-up) lower bound."""
    snapped = snap_rate(r, groups)
    if lb is not None:
        lowest = valid_rates(groups, lb)[0]
        if snapped < lowest - RATE_TOLERANCE:
            raise ZooError(
                f"rate {_rate_text(snapped)} is below the lower bound {_rate_text(lowest)} the model was trained with",
                f"use a rate >= {_rate_text(lowest)} or retrain with --lb {_rate_text(snapped)}",
            )
    return snapped


def _grid_text(j: int, g: int) -> str:
    """The rate ``j/g`` as a user can type it: ``0.75``, or ``1/3`` where the short decimal is not on the grid."""
    text = _rate_text(j / g)
    return text if same_rate(float(text), j / g) else f"{j}/{g}"


def _check_on_grid(value: float, token: str, text: str, g: int, lb: float | None) -> None:
    """Raise ``ZooError`` quoting ``token`` when ``value`` is not a multiple of ``1/g`` (within ``RATE_TOLERANCE``),
    naming the nearest valid rates (those >= ``lb`` when given)."""
    if same_rate(value, round(value * g) / g):
        return
    grid = [round(r * g) for r in valid_rates(g, lb)]
    below = [j for j in grid if j / g < value][-1:]
    above = [j for j in grid if j / g > value][:1]
    nearest = " or ".join(_grid_text(j, g) for j in below + above)
    raise ZooError(
        f"slice rate {token!r} in {text!r} is not a valid rate (multiples of 1/{g})",
        f"pass a rate on the grid, e.g. {nearest}",
    )


def parse_rates(text: str, groups: int, *, lb: float | None = None, strict: bool = False) -> list[float]:
    """Rates from a CLI list such as ``"0.375,0.5,1"`` (fractions like ``3/8`` too): snapped, sorted, unique.

    Each token goes through ``check_rate`` (so with ``lb`` given, rates below it raise). A token that is not a
    number, or not in (0, 1], raises ``ZooError`` naming the token; an empty list raises too. With ``strict``
    (what the CLI uses for rates a user typed) a token that is not a multiple of ``1/groups`` within
    ``RATE_TOLERANCE`` raises ``ZooError`` quoting it and naming the nearest valid rates, instead of snapping.
    """
    g = _check_groups(groups)
    tokens = [t.strip() for t in str(text).split(",")]
    if not any(tokens):
        raise ZooError(f"no slice rates in {text!r}", "pass comma-separated rates in (0, 1], e.g. 0.375,0.5,1")
    snapped: set[int] = set()
    for token in tokens:
        if not token:  # tolerate "0.5,,1" and a trailing comma
            continue
        try:
            value = float(Fraction(token))
        except (ValueError, ZeroDivisionError):
            raise ZooError(
                f"slice rate {token!r} in {text!r} is not a number",
                "pass comma-separated rates in (0, 1], e.g. 0.375,0.5,1",
            ) from None
        if not 0.0 < value <= 1.0:
            raise ZooError(
                f"slice rate {token!r} in {text!r} is not in (0, 1]",
                "pass comma-separated rates in (0, 1], e.g. 0.375,0.5,1",
            )
        if strict:
            _check_on_grid(value, token, text, g, lb)
        snapped.add(round(check_rate(value, g, lb) * g))
    return [j / g for j in sorted(snapped)]


# ----------------------------------------------------------------------------------------------------------------
# Eq. 10: a distribution over r as a categorical over the valid rates


def _as_rates(rates: Sequence[float]) -> tuple[float, ...]:
    """``rates`` as a tuple of floats in (0, 1], strictly ascending, ending at 1 (what schedulers train)."""
    values = tuple(float(r) for r in rates)
    if not values:
        raise ZooError("no slice rates to schedule", "pass valid_rates(groups, lb), e.g. valid_rates(16, 0.375)")
    for r in values:
        _check_unit_interval(r, "slice rate", "pass valid_rates(groups, lb), e.g. valid_rates(16, 0.375)")
    if any(b - a <= RATE_TOLERANCE for a, b in zip(values, values[1:])):
        raise ZooError(
            f"slice rates {list(values)} are not strictly ascending",
            "pass valid_rates(groups, lb), e.g. valid_rates(16, 0.375)",
        )
    if abs(values[-1] - 1.0) > RATE_TOLERANCE:
        raise ZooError(
            f"slice rates {list(values)} do not end at 1", "pass valid_rates(groups, lb), which always ends at 1"
        )
    return values


def rate_probabilities(cdf: Callable[[float], float], rates: Sequence[float]) -> np.ndarray:
    """Eq. 10: the categorical over ascending ``rates`` that a continuous ``r ~ F`` induces by rounding.

    ``p(r_1) = F(m_1)``, ``p(r_i) = F(m_i) − F(m_{i−1})``, ``p(r_N) = 1 − F(m_{N−1})`` with ``m_i`` the midpoint of
    ``r_i`` and ``r_{i+1}``: the same as sampling r, clipping it to ``[r_1, r_N]`` and rounding to the nearest rate.
    ``cdf`` is called with one float at a time and must be non-decreasing. The result sums to 1; one rate gives [1.0].
    """
    r = np.asarray([float(x) for x in rates], dtype=np.float64)
    if r.size == 0:
        raise ZooError("no slice rates to put probabilities on", "pass at least one rate, e.g. valid_rates(16)")
    if np.any(np.diff(r) <= 0):
        raise ZooError(f"slice rates {r.tolist()} are not strictly ascending", "pass valid_rates(groups, lb)")
    midpoints = (r[:-1] + r[1:]) / 2
    cumulative = np.asarray([float(cdf(float(m))) for m in midpoints], dtype=np.float64)
    if np.any(~np.isfinite(cumulative)) or np.any(cumulative < 0) or np.any(cumulative > 1):
        raise ZooError("the rate distribution's CDF left [0, 1]", "pass a CDF of a proper distribution")
    if np.any(np.diff(cumulative) < 0):
        raise ZooError("the rate distribution's CDF is decreasing", "pass a non-decreasing CDF")
    return np.diff(np.concatenate(([0.0], cumulative, [1.0])))


# ----------------------------------------------------------------------------------------------------------------
# Schedulers


@runtime_checkable
class RateScheduler(Protocol):
    """Which slice rate each training batch uses: a categorical over ``rates`` that may change with progress."""

    rates: tuple[float, ...]

    def probabilities(self, progress: float) -> np.ndarray:
        """The categorical over ``rates`` at ``progress`` (fraction of training done, in [0, 1])."""
        ...

    def sample(self, progress: float, rng: np.random.Generator) -> float:
        """One rate drawn from ``probabilities(progress)`` with ``rng.choice`` (deterministic given ``rng``)."""
        ...


def _check_progress(progress: float) -> float:
    if not _is_number(progress) or not 0.0 <= progress <= 1.0:
        raise ZooError(f"training progress {progress!r} is not in [0, 1]", "pass step / total_steps")
    return float(progress)


def _draw(rates: tuple[float, ...], p: np.ndarray, rng: np.random.Generator) -> float:
    return rates[int(rng.choice(len(rates), p=p))]


@dataclass(frozen=True)
class DynamicScheduler:
    """Dynamic scheduling (§3.5.2): the same distribution throughout training, rounded to ``rates`` by Eq. 10.

    ``distribution="normal"``: ``r ~ N(mean, std)``. The paper writes N(1, 1/3) (§5.1.2) and calls the second
    parameter a variance; we read 1/3 as the *standard deviation*. ``distribution="uniform"``:
    ``r ~ U(lb − span, 1 + span)`` with ``lb = rates[0]`` and ``span >= 0``. Either way the probabilities equal
    sampling r, clipping it to [lb, 1] and rounding to the nearest valid rate. The unused parameters are ignored.
    """

    rates: tuple[float, ...]
    distribution: str = "normal"
    mean: float = 1.0
    std: float = 1 / 3
    span: float = 0.0
    _probabilities: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rates", _as_rates(self.rates))
        if self.distribution not in DISTRIBUTIONS:
            raise ZooError(
                f"unknown rate distribution {self.distribution!r}", f"use one of: {', '.join(DISTRIBUTIONS)}"
            )
        if self.distribution == "normal":
            if not _is_number(self.mean) or not math.isfinite(self.mean):
                raise ZooError(f"normal mean {self.mean!r} is not a finite number", "use e.g. mean=1.0")
            if not _is_number(self.std) or not math.isfinite(self.std) or self.std <= 0:
                raise ZooError(f"normal std {self.std!r} is not a positive number", "use e.g. std=0.333")
        elif not _is_number(self.span) or not math.isfinite(self.span) or self.span < 0:
            raise ZooError(f"uniform span {self.span!r} is not a number >= 0", "use e.g. span=0.0")
        object.__setattr__(self, "_probabilities", self._eq10())

    def _eq10(self) -> np.ndarray:
        if len(self.rates) == 1:
            return np.ones(1)
        if self.distribution == "normal":
            dist = stats.norm(loc=float(self.mean), scale=float(self.std))
        else:
            low, high = self.rates[0] - float(self.span), 1.0 + float(self.span)
            dist = stats.uniform(loc=low, scale=high - low)
        return rate_probabilities(dist.cdf, self.rates)

    def probabilities(self, progress: float) -> np.ndarray:
        """The Eq. 10 categorical over ``rates`` (the same at every ``progress``)."""
        _check_progress(progress)
        return self._probabilities.copy()

    def sample(self, progress: float, rng: np.random.Generator) -> float:
        """One rate drawn from ``probabilities(progress)``."""
        return _draw(self.rates, self.probabilities(progress), rng)


@dataclass(frozen=True)
class ProgressiveDynamicScheduler:
    """Progressive dynamic scheduling (§3.5.2): ``r = 1`` while ``progress < warmup``, then ``inner``'s distribution.

    ``inner`` defaults to ``DynamicScheduler(rates)`` (N(1, 1/3)); a given ``inner`` must schedule the same rates.
    """

    rates: tuple[float, ...]
    warmup: float = 0.3
    inner: DynamicScheduler | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rates", _as_rates(self.rates))
        if not _is_number(self.warmup) or not 0.0 <= self.warmup <= 1.0:
            raise ZooError(f"warmup {self.warmup!r} is not in [0, 1]", "use the fraction of training at r=1, e.g. 0.3")
        if self.inner is None:
            object.__setattr__(self, "inner", DynamicScheduler(self.rates))
        elif not _same_rates(self.inner.rates, self.rates):
            raise ZooError(
                f"inner scheduler rates {list(self.inner.rates)} differ from {list(self.rates)}",
                "build the inner DynamicScheduler on the same rates",
            )

    def probabilities(self, progress: float) -> np.ndarray:
        """Probability 1 on the last rate (1.0) before ``warmup``, then the inner Eq. 10 categorical."""
        if _check_progress(progress) < self.warmup:
            p = np.zeros(len(self.rates))
            p[-1] = 1.0
            return p
        return self.inner.probabilities(progress)

    def sample(self, progress: float, rng: np.random.Generator) -> float:
        """One rate drawn from ``probabilities(progress)``."""
        return _draw(self.rates, self.probabilities(progress), rng)


@dataclass(frozen=True)
class ProgressiveStaticScheduler:
    """Progressive static scheduling (§3.5.2): r rises monotonically from ``lb`` to 1, one rate per stage.

    Training is split into ``len(rates)`` equal stages; stage ``i`` (progress in ``[i/N, (i+1)/N)``, the last
    stage also taking progress 1) trains ``rates[i]`` only. The paper fixes a converged r-net's parameters before
    moving on: ``frozen_rate`` names the previous stage's rate, whose sub-network (which contains every smaller
    one) the trainer keeps fixed.
    """

    rates: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rates", _as_rates(self.rates))

    def stage(self, progress: float) -> int:
        """The stage index at ``progress``: ``min(floor(progress * N), N - 1)`` (``RATE_TOLERANCE`` slack at
        stage boundaries)."""
        n = len(self.rates)
        return min(math.floor(_check_progress(progress) * n + RATE_TOLERANCE), n - 1)

    def frozen_rate(self, progress: float) -> float | None:
        """The previous stage's rate, whose sub-network stays fixed at ``progress``; None in stage 0."""
        i = self.stage(progress)
        return self.rates[i - 1] if i > 0 else None

    def probabilities(self, progress: float) -> np.ndarray:
        """Probability 1 on the current stage's rate."""
        p = np.zeros(len(self.rates))
        p[self.stage(progress)] = 1.0
        return p

    def sample(self, progress: float, rng: np.random.Generator) -> float:
        """The current stage's rate (drawn with ``rng.choice`` like every scheduler, so rng use is uniform)."""
        return _draw(self.rates, self.probabilities(progress), rng)


@dataclass(frozen=True)
class SandwichScheduler:
    """The sandwich rule: every batch trains the largest rate (1), the smallest (``lb = rates[0]``) and ``random``
    rates drawn uniformly, with replacement, from those strictly in between (their gradients add up).

    ``step_rates`` gives one batch's rates, largest first (so in-place distillation has its teacher first).
    ``probabilities``/``sample`` describe one forward pass drawn at random from a batch's passes: the share of
    the training work each rate gets.
    """

    rates: tuple[float, ...]
    random: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "rates", _as_rates(self.rates))
        if isinstance(self.random, bool) or not isinstance(self.random, int | np.integer) or self.random < 0:
            raise ZooError(f"sandwich random rates {self.random!r} is not an integer >= 0", "use e.g. --random-rates 2")

    def step_rates(self, progress: float, rng: np.random.Generator) -> tuple[float, ...]:
        """The rates of one batch: 1, lb, then ``random`` draws from the rates in between (none when there are none;
        one rate in all gives just ``(1.0,)``)."""
        _check_progress(progress)
        if len(self.rates) == 1:
            return (self.rates[0],)
        inner = self.rates[1:-1]
        drawn = [inner[int(i)] for i in rng.integers(len(inner), size=self.random)] if inner else []
        return (self.rates[-1], self.rates[0], *drawn)

    def probabilities(self, progress: float) -> np.ndarray:
        """Each rate's share of a batch's forward passes (the same at every ``progress``)."""
        _check_progress(progress)
        p = np.zeros(len(self.rates))
        p[-1] = 1.0
        if len(self.rates) > 1:
            p[0] = 1.0
            if len(self.rates) > 2:
                p[1:-1] = self.random / (len(self.rates) - 2)
        return p / p.sum()

    def sample(self, progress: float, rng: np.random.Generator) -> float:
        """One forward pass's rate drawn from ``probabilities(progress)``."""
        return _draw(self.rates, self.probabilities(progress), rng)


def _same_rates(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(map(same_rate, a, b))


_OPTIONS: dict[str, tuple[str, ...]] = {
    "normal": ("mean", "std"),
    "uniform": ("span",),
    "progressive-dynamic": ("warmup", "distribution", "mean", "std", "span"),
    "progressive-static": (),
    "sandwich": ("random",),
}


def make_scheduler(name: str, rates: Sequence[float], **options: object) -> RateScheduler:
    """The scheduler called ``name`` (one of ``SCHEDULERS``) over ``rates``.

    Options: normal — ``mean``, ``std``; uniform — ``span``; progressive-dynamic — ``warmup`` plus the inner
    ``distribution`` ("normal" or "uniform") and its ``mean``/``std``/``span``; progressive-static — none;
    sandwich — ``random`` (rates drawn per batch besides 1 and lb, default 2).
    Options set to None take their defaults (handy for CLI flags left unset). Unknown names/options raise ``ZooError``.
    """
    if name not in SCHEDULERS:
        raise ZooError(f"unknown rate scheduler {name!r}", f"use one of: {', '.join(SCHEDULERS)}")
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in _OPTIONS[name]:
            allowed = ", ".join(_OPTIONS[name]) or "none"
            raise ZooError(f"unknown option {key!r} for rate scheduler {name!r}", f"its options are: {allowed}")
    if name in DISTRIBUTIONS:
        return DynamicScheduler(rates, distribution=name, **given)
    if name == "progressive-dynamic":
        warmup = given.pop("warmup", 0.3)
        return ProgressiveDynamicScheduler(rates, warmup=warmup, inner=DynamicScheduler(rates, **given))
    if name == "sandwich":
        if "random" in given and _is_number(given["random"]) and float(given["random"]).is_integer():
            given["random"] = int(given["random"])  # a CLI or JSON number
        return SandwichScheduler(rates, **given)
    return ProgressiveStaticScheduler(rates)


def rate_schedule_summary(
    scheduler: RateScheduler, samples: int = 10000, seed: int = 0, *, progress: float | None = None
) -> dict[float, float]:
    """Empirical frequency of every scheduled rate over ``samples`` draws of ``scheduler.sample``.

    With ``progress=None`` the draws walk the whole run (draw i at progress ``(i + 0.5) / samples``); with a
    number, every draw is at that progress. Keys are ``scheduler.rates`` (zero-frequency rates included);
    values sum to 1. Deterministic given ``seed``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 1:
        raise ZooError(f"samples {samples!r} is not an integer >= 1", "use e.g. samples=10000")
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(scheduler.rates, 0)
    for i in range(samples):
        at = (i + 0.5) / samples if progress is None else progress
        counts[scheduler.sample(at, rng)] += 1
    return {r: c / samples for r, c in counts.items()}
