"""Count the @given examples that reach their property's check, per test function.

A property test that returns early for some inputs (a plan with nothing to prune, widths a group count
does not divide, ...) passes vacuously if the generator stops producing anything else. ``at_least``
makes such a test fail instead::

    @at_least(20)                     # above @given: wraps the whole hypothesis run
    @settings(max_examples=50)
    @given(spec=random_net_specs())
    def test_property(spec):
        ...
        if nothing_to_check:
            return
        assert pruned == reference
        reached()                    # this example checked the property

All examples of a @given test run inside one call of the test function, in one process (under
pytest-xdist too: a test item is never split between workers), so the count is that call's own; it
includes @example cases, and hypothesis' replay of a failing example only happens when the test fails.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

_counts: list[int] = []  # one counter per running at_least-wrapped test (a stack, for safety)


def reached() -> None:
    """Record that the current example got to (and passed) the property's check."""
    if not _counts:
        raise RuntimeError("reached() called outside a test wrapped by helpers.reached.at_least")
    _counts[-1] += 1


def at_least(minimum: int) -> Callable:
    """Decorator placed above ``@given``: after the whole hypothesis run, assert that at least ``minimum``
    examples called :func:`reached`."""

    def wrap(test: Callable) -> Callable:
        @functools.wraps(test)
        def wrapper(*args, **kwargs):
            _counts.append(0)
            try:
                test(*args, **kwargs)
                count = _counts[-1]
            finally:
                _counts.pop()
            wrapper.last_count = count  # for inspection (e.g. from a debugger or a script)
            assert count >= minimum, (
                f"only {count} examples of {test.__name__} reached the property check (need >= {minimum}): "
                "the generator no longer produces cases the test can check"
            )

        return wrapper

    return wrap
