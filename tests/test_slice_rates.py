"""Slice rates: valid rates, snapping, CLI parsing, Eq. 10 vs Monte-Carlo, the three schedulers, determinism."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from zoocompiler.core.errors import ZooError
from zoocompiler.solvers.slice_rates import (
    SCHEDULERS,
    DynamicScheduler,
    ProgressiveDynamicScheduler,
    ProgressiveStaticScheduler,
    RateScheduler,
    SandwichScheduler,
    check_rate,
    make_scheduler,
    parse_rates,
    rate_probabilities,
    rate_schedule_summary,
    snap_rate,
    valid_rates,
)

G = 16
LB = 0.375


def _as_j(rates, groups=G):
    """Rates as integers j = round(r * G), asserting each is a multiple of 1/G to 1e-9."""
    js = [round(r * groups) for r in rates]
    assert all(abs(r - j / groups) <= 1e-9 for r, j in zip(rates, js))
    return js


# --------------------------------------------------------------------------------------------------------------
# valid_rates / snap_rate / check_rate / parse_rates


def test_valid_rates_g16_lb0375_are_six_to_sixteen_sixteenths():
    rates = valid_rates(16, 0.375)
    assert rates == [j / 16 for j in range(6, 17)]
    assert rates[0] == 0.375 and rates[-1] == 1.0 and len(rates) == 11


def test_valid_rates_without_lb_and_edge_groups():
    assert valid_rates(4) == [0.25, 0.5, 0.75, 1.0]
    assert valid_rates(1) == [1.0]
    assert valid_rates(1, 0.01) == [1.0]
    assert valid_rates(16, 1.0) == [1.0]
    assert valid_rates(np.int64(2)) == [0.5, 1.0]


def test_valid_rates_rounds_lb_up_to_the_next_valid_rate():
    assert valid_rates(16, 0.3)[0] == 5 / 16  # 0.3 * 16 = 4.8 -> 5
    assert valid_rates(16, 0.3126)[0] == 6 / 16
    assert valid_rates(3, 1 / 3) == [1 / 3, 2 / 3, 1.0]  # 1/3 * 3 is not exactly 1 in floats; still j = 1
    assert valid_rates(10, 0.7) == [0.7, 0.8, 0.9, 1.0]  # 0.7 * 10 = 7.000000000000001 is still 7


@pytest.mark.parametrize("lb", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_valid_rates_rejects_lb_outside_unit_interval(lb):
    with pytest.raises(ZooError, match="lower bound"):
        valid_rates(16, lb)


@pytest.mark.parametrize("groups", [0, -3, 2.5, True, "16"])
def test_valid_rates_rejects_bad_groups(groups):
    with pytest.raises(ZooError, match="groups must be an integer >= 1"):
        valid_rates(groups)


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        (0.5, 0.5),
        (0.51, 0.5),
        (0.53, 0.5),  # 8.48 -> 8
        (0.54, 0.5625),  # 8.64 -> 9
        (1.0, 1.0),
        (0.97, 1.0),
        (0.001, 1 / 16),  # below 1/(2G) still snaps to the smallest rate
        (3 / 32, 2 / 16),  # tie between 1/16 and 2/16 goes up
        (0.40625, 0.4375),  # tie between 6/16 and 7/16 goes up
    ],
)
def test_snap_rate(r, expected):
    assert snap_rate(r, 16) == expected


@pytest.mark.parametrize("r", [0.0, -0.5, 1.0001, float("nan"), float("-inf"), "0.5", None])
def test_snap_rate_rejects_rates_outside_unit_interval(r):
    with pytest.raises(ZooError, match="slice rate"):
        snap_rate(r, 16)


def test_check_rate_snaps_and_enforces_lower_bound():
    assert check_rate(0.374, 16, lb=0.375) == 0.375  # snaps up onto lb
    assert check_rate(0.8, 16) == 0.8125
    assert check_rate(1.0, 16, lb=1.0) == 1.0
    with pytest.raises(ZooError) as info:
        check_rate(0.25, 16, lb=0.375)
    assert str(info.value) == (
        "rate 0.25 is below the lower bound 0.375 the model was trained with"
        " — use a rate >= 0.375 or retrain with --lb 0.25"
    )
    assert info.value.fix == "use a rate >= 0.375 or retrain with --lb 0.25"
    with pytest.raises(ZooError, match="below the lower bound 0.3125"):  # lb 0.3 rounds up to 5/16
        check_rate(0.25, 16, lb=0.3)


def test_parse_rates_snaps_sorts_and_deduplicates():
    assert parse_rates("0.375,0.5,1", 16) == [0.375, 0.5, 1.0]
    assert parse_rates(" 1 , 0.5,0.51, 3/8,", 16) == [0.375, 0.5, 1.0]
    assert parse_rates("0.3", 4) == [0.25]
    assert parse_rates("0.5,1", 16, lb=0.375) == [0.5, 1.0]
    with pytest.raises(ZooError, match="below the lower bound"):
        parse_rates("0.25,1", 16, lb=0.375)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0.5,abc,1", "'abc'"),
        ("0.5,1/0", "'1/0'"),
        ("0.5,nan", "'nan'"),
        ("0.5,1.5", "'1.5'.*not in \\(0, 1\\]"),
        ("0,1", "'0'.*not in \\(0, 1\\]"),
        ("", "no slice rates"),
        (" , ", "no slice rates"),
    ],
)
def test_parse_rates_errors_name_the_token(text, match):
    with pytest.raises(ZooError, match=match):
        parse_rates(text, 16)


# --------------------------------------------------------------------------------------------------------------
# Eq. 10


def test_rate_probabilities_eq10_by_hand():
    rates = [0.5, 0.75, 1.0]
    p = rate_probabilities(stats.uniform(loc=0.5, scale=0.5).cdf, rates)
    # midpoints 0.625 and 0.875 split U(0.5, 1) into 1/4, 1/2, 1/4
    np.testing.assert_allclose(p, [0.25, 0.5, 0.25], rtol=0, atol=1e-15)
    assert rate_probabilities(lambda x: 0.3, [1.0]).tolist() == [1.0]
    # a scalar-only CDF works too
    p = rate_probabilities(lambda x: 1.0 if x >= 0.7 else 0.0, rates)
    assert p.tolist() == [0.0, 1.0, 0.0]


def test_rate_probabilities_rejects_bad_input():
    with pytest.raises(ZooError, match="no slice rates"):
        rate_probabilities(stats.norm().cdf, [])
    with pytest.raises(ZooError, match="not strictly ascending"):
        rate_probabilities(stats.norm().cdf, [0.5, 0.5, 1.0])
    with pytest.raises(ZooError, match="decreasing"):
        rate_probabilities(lambda x: 1 - x, [0.25, 0.5, 1.0])
    with pytest.raises(ZooError, match="left \\[0, 1\\]"):
        rate_probabilities(lambda x: 2.0, [0.5, 1.0])


def _monte_carlo(draw_continuous, groups, lb, n, seed):
    """Frequencies of 'sample r, clip to [lb, 1], round to the nearest valid rate', independent of the module."""
    rates = np.arange(math.ceil(lb * groups - 1e-9), groups + 1) / groups
    r = np.clip(draw_continuous(np.random.default_rng(seed), n), rates[0], 1.0)
    j = np.floor(r * groups + 0.5).astype(int)
    counts = np.bincount(j - round(rates[0] * groups), minlength=len(rates))
    return rates, counts


@pytest.mark.parametrize(
    ("scheduler_options", "draw"),
    [
        (dict(distribution="normal"), lambda rng, n: rng.normal(1.0, 1 / 3, n)),
        (dict(distribution="normal", mean=0.6, std=0.1), lambda rng, n: rng.normal(0.6, 0.1, n)),
        (dict(distribution="uniform"), lambda rng, n: rng.uniform(LB, 1.0, n)),
        (dict(distribution="uniform", span=0.2), lambda rng, n: rng.uniform(LB - 0.2, 1.2, n)),
    ],
)
def test_eq10_matches_monte_carlo_of_clip_and_round(scheduler_options, draw):
    n = 200_000
    scheduler = DynamicScheduler(valid_rates(G, LB), **scheduler_options)
    rates, counts = _monte_carlo(draw, G, LB, n, seed=1234)
    assert list(scheduler.rates) == rates.tolist()
    p = scheduler.probabilities(0.5)
    assert p.shape == (11,) and abs(p.sum() - 1.0) < 1e-12 and (p >= 0).all()
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 3 * sigma + 1e-9), (counts, n * p)


def test_normal_default_is_n_1_third_as_std():
    scheduler = DynamicScheduler(valid_rates(G, LB))
    p = scheduler.probabilities(0.0)
    # the last rate takes everything above the midpoint 31/32
    assert p[-1] == pytest.approx(1 - stats.norm.cdf((31 / 32 - 1) / (1 / 3)), abs=1e-12)
    assert p[0] == pytest.approx(stats.norm.cdf((6.5 / 16 - 1) * 3), abs=1e-12)
    assert p[-1] > 0.5


# --------------------------------------------------------------------------------------------------------------
# Schedulers


def test_progressive_dynamic_is_r1_only_before_warmup():
    rates = valid_rates(G, LB)
    scheduler = ProgressiveDynamicScheduler(rates, warmup=0.3)
    rng = np.random.default_rng(0)
    for progress in np.linspace(0, 0.3, 50, endpoint=False):
        assert scheduler.probabilities(progress).tolist() == [0.0] * 10 + [1.0]
        assert scheduler.sample(progress, rng) == 1.0
    inner = DynamicScheduler(rates).probabilities(0.0)
    np.testing.assert_array_equal(scheduler.probabilities(0.3), inner)
    np.testing.assert_array_equal(scheduler.probabilities(1.0), inner)
    after = {scheduler.sample(0.5, rng) for _ in range(2000)}
    assert len(after) >= 8 and after <= set(rates)


def test_progressive_dynamic_inner_must_share_rates_and_warmup_in_range():
    with pytest.raises(ZooError, match="inner scheduler rates"):
        ProgressiveDynamicScheduler(valid_rates(G, LB), inner=DynamicScheduler(valid_rates(G, 0.5)))
    with pytest.raises(ZooError, match="warmup"):
        ProgressiveDynamicScheduler(valid_rates(G, LB), warmup=1.5)


def test_progressive_static_stages_are_monotone_cover_every_rate_and_freeze_the_previous():
    rates = valid_rates(G, LB)
    n = len(rates)
    scheduler = ProgressiveStaticScheduler(rates)
    total_steps = 1100
    rng = np.random.default_rng(0)
    stages, drawn = [], []
    for step in range(total_steps + 1):
        progress = step / total_steps
        stages.append(scheduler.stage(progress))
        drawn.append(scheduler.sample(progress, rng))
        p = scheduler.probabilities(progress)
        assert p.sum() == 1.0 and p[stages[-1]] == 1.0
        expected_frozen = None if stages[-1] == 0 else rates[stages[-1] - 1]
        assert scheduler.frozen_rate(progress) == expected_frozen
    assert all(a <= b for a, b in zip(stages, stages[1:]))
    assert all(a <= b for a, b in zip(drawn, drawn[1:]))
    assert sorted(set(drawn)) == rates
    # equal stages: 100 steps each (the final step, progress 1, belongs to the last stage)
    assert [stages.count(i) for i in range(n)] == [100] * (n - 1) + [101]
    assert scheduler.stage(0.0) == 0 and scheduler.frozen_rate(0.0) is None
    assert scheduler.stage(1.0) == n - 1 and scheduler.frozen_rate(1.0) == rates[-2]
    assert scheduler.stage(3 / n) == 3  # stage boundaries are robust to float rounding


def test_progress_must_be_in_unit_interval():
    for scheduler in (make_scheduler(name, valid_rates(G, LB)) for name in SCHEDULERS):
        for bad in (-0.01, 1.01, float("nan")):
            with pytest.raises(ZooError, match="progress"):
                scheduler.probabilities(bad)


def test_make_scheduler_names_and_options():
    rates = valid_rates(G, LB)
    assert SCHEDULERS == ("normal", "uniform", "progressive-dynamic", "progressive-static", "sandwich")
    normal = make_scheduler("normal", rates, mean=0.8, std=0.2)
    assert normal == DynamicScheduler(rates, "normal", mean=0.8, std=0.2)
    uniform = make_scheduler("uniform", rates, span=0.1, warmup=None)  # None = default
    assert uniform == DynamicScheduler(rates, "uniform", span=0.1)
    pd = make_scheduler("progressive-dynamic", rates, warmup=0.5, distribution="uniform")
    assert isinstance(pd, ProgressiveDynamicScheduler) and pd.warmup == 0.5
    assert pd.inner == DynamicScheduler(rates, "uniform")
    ps = make_scheduler("progressive-static", rates)
    assert isinstance(ps, ProgressiveStaticScheduler)
    sw = make_scheduler("sandwich", rates, random=3.0)  # a CLI/JSON number that is an integer
    assert sw == SandwichScheduler(rates, random=3) and isinstance(sw.random, int)
    for scheduler in (normal, uniform, pd, ps, sw):
        assert isinstance(scheduler, RateScheduler)
        assert scheduler.rates == tuple(rates)
    with pytest.raises(ZooError) as info:
        make_scheduler("cosine", rates)
    assert "unknown rate scheduler 'cosine'" in str(info.value)
    assert info.value.fix == "use one of: normal, uniform, progressive-dynamic, progressive-static, sandwich"
    with pytest.raises(ZooError, match="unknown option 'span' for rate scheduler 'normal'.*mean, std"):
        make_scheduler("normal", rates, span=0.1)
    with pytest.raises(ZooError, match="its options are: none"):
        make_scheduler("progressive-static", rates, warmup=0.2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rates=[]), "no slice rates"),
        (dict(rates=[0.5, 0.75]), "do not end at 1"),
        (dict(rates=[0.75, 0.5, 1.0]), "not strictly ascending"),
        (dict(rates=[0.0, 1.0]), "not in \\(0, 1\\]"),
        (dict(rates=[0.5, 1.0], distribution="beta"), "unknown rate distribution 'beta'"),
        (dict(rates=[0.5, 1.0], std=0.0), "std"),
        (dict(rates=[0.5, 1.0], mean=float("inf")), "mean"),
        (dict(rates=[0.5, 1.0], distribution="uniform", span=-0.1), "span"),
    ],
)
def test_dynamic_scheduler_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ZooError, match=match):
        DynamicScheduler(**kwargs)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_seeds_reproduce_exactly(name):
    scheduler = make_scheduler(name, valid_rates(G, LB))

    def run(seed):
        rng = np.random.default_rng(seed)
        return [scheduler.sample(step / 499, rng) for step in range(500)]

    assert run(7) == run(7)
    if name != "progressive-static":
        assert run(7) != run(8)
    assert rate_schedule_summary(scheduler, samples=2000, seed=3) == rate_schedule_summary(
        scheduler, samples=2000, seed=3
    )


def test_rate_schedule_summary_frequencies():
    rates = valid_rates(G, LB)
    static = rate_schedule_summary(ProgressiveStaticScheduler(rates), samples=1100)
    assert static == {r: 100 / 1100 for r in rates}
    warm = rate_schedule_summary(ProgressiveDynamicScheduler(rates, warmup=0.5), samples=1000, progress=0.2)
    assert warm == {r: (1.0 if r == 1.0 else 0.0) for r in rates}
    normal = DynamicScheduler(rates)
    freq = rate_schedule_summary(normal, samples=10000, seed=0)
    assert list(freq) == rates and sum(freq.values()) == pytest.approx(1.0, abs=1e-12)
    p = normal.probabilities(0.0)
    assert np.all(np.abs(np.array(list(freq.values())) - p) <= 4 * np.sqrt(p * (1 - p) / 10000) + 1e-12)
    with pytest.raises(ZooError, match="samples"):
        rate_schedule_summary(normal, samples=0)


# --------------------------------------------------------------------------------------------------------------
# Property: any G, lb, distribution parameters give a proper categorical on the valid rates


@settings(max_examples=200)
@given(
    groups=st.integers(1, 32),
    lb=st.floats(1e-3, 1.0),
    mean=st.floats(-2.0, 3.0),
    std=st.floats(1e-3, 5.0),
    span=st.floats(0.0, 2.0),
    warmup=st.floats(0.0, 1.0),
    progress=st.floats(0.0, 1.0),
)
def test_probabilities_are_a_categorical_on_the_valid_rates(groups, lb, mean, std, span, warmup, progress):
    rates = valid_rates(groups, lb)
    js = _as_j(rates, groups)
    assert js == list(range(js[0], groups + 1)) and rates[0] >= lb - 1e-9 and (js[0] - 1) / groups < lb
    schedulers = [
        DynamicScheduler(rates, "normal", mean=mean, std=std),
        DynamicScheduler(rates, "uniform", span=span),
        ProgressiveDynamicScheduler(rates, warmup=warmup, inner=DynamicScheduler(rates, "uniform", span=span)),
        ProgressiveStaticScheduler(rates),
    ]
    rng = np.random.default_rng(0)
    for scheduler in schedulers:
        p = scheduler.probabilities(progress)
        assert p.shape == (len(rates),)
        assert (p >= 0).all() and abs(p.sum() - 1.0) < 1e-12
        assert scheduler.rates == tuple(rates)
        assert scheduler.sample(progress, rng) in rates


# ----------------------------------------------------------------------------- the sandwich rule


def test_sandwich_trains_largest_smallest_and_random_inner_rates():
    rates = valid_rates(G, 0.25)
    sw = SandwichScheduler(rates, random=2)
    rng = np.random.default_rng(0)
    inner = Counter()
    for step in range(2000):
        batch = sw.step_rates(step / 2000, rng)
        assert len(batch) == 4 and batch[0] == 1.0 and batch[1] == rates[0]  # largest first: the teacher
        assert all(rates[0] < r < 1.0 for r in batch[2:])
        inner.update(batch[2:])
    assert set(inner) == set(rates[1:-1])  # every inner rate is reached, about uniformly
    assert max(inner.values()) / min(inner.values()) < 1.6
    p = sw.probabilities(0.3)  # each rate's share of the forward passes
    assert p[0] == pytest.approx(0.25) and p[-1] == pytest.approx(0.25) and p.sum() == pytest.approx(1.0)
    assert np.allclose(p[1:-1], 0.5 / (len(rates) - 2))
    summary = rate_schedule_summary(sw, samples=4000)
    assert summary[1.0] == pytest.approx(0.25, abs=0.03) and summary[rates[0]] == pytest.approx(0.25, abs=0.03)


def test_sandwich_on_short_rate_lists_and_bad_options():
    rng = np.random.default_rng(0)
    assert SandwichScheduler((1.0,)).step_rates(0.5, rng) == (1.0,)
    assert SandwichScheduler((0.5, 1.0), random=3).step_rates(0.5, rng) == (1.0, 0.5)
    assert SandwichScheduler((0.5, 0.75, 1.0), random=0).step_rates(0.5, rng) == (1.0, 0.5)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ZooError, match="sandwich random rates"):
            SandwichScheduler((0.5, 1.0), random=bad)
    with pytest.raises(ZooError, match="unknown option 'std' for rate scheduler 'sandwich'.*random"):
        make_scheduler("sandwich", (0.5, 1.0), std=0.2)
    with pytest.raises(ZooError, match="progress"):
        SandwichScheduler((0.5, 1.0)).step_rates(1.5, rng)
