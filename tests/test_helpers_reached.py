"""helpers.reached: a @given test whose examples stop reaching the property check fails; one that reaches passes."""

from __future__ import annotations

import pytest
from helpers.reached import at_least, reached
from hypothesis import given, settings
from hypothesis import strategies as st


def _property(n: int, reach_if) -> None:
    if not reach_if(n):
        return  # the early return the count guards against
    assert n == n
    reached()


def test_a_property_that_never_reaches_its_check_fails():
    @at_least(5)
    @settings(max_examples=20, database=None)
    @given(st.integers())
    def vacuous(n):
        _property(n, lambda n: False)

    with pytest.raises(AssertionError, match=r"only 0 examples of vacuous reached the property check \(need >= 5\)"):
        vacuous()


def test_a_property_that_reaches_its_check_passes_and_counts_each_run_alone():
    @at_least(20)
    @settings(max_examples=20, database=None)
    @given(st.integers())
    def always(n):
        _property(n, lambda n: True)

    always()
    first = always.last_count
    assert first >= 20
    always()  # a second run counts from zero again
    assert 20 <= always.last_count < 2 * first


def test_reached_outside_a_wrapped_test_is_an_error():
    with pytest.raises(RuntimeError, match="outside a test wrapped"):
        reached()
