"""The test-side waiting helpers: what they return and what their failures say."""

from __future__ import annotations

import itertools

import pytest

from tests.polling import consistently, eventually


def test_eventually_returns_the_first_truthy_value() -> None:
    values = iter([None, 0, "", {"id": 7}])
    assert eventually(lambda: next(values), timeout=5, every=0.001) == {"id": 7}


def test_eventually_names_what_it_waited_for_and_the_last_value() -> None:
    counter = itertools.count()

    def ready() -> bool:
        next(counter)
        return False

    with pytest.raises(AssertionError, match=r"the run to finish: not met within 0.05s"):
        eventually(lambda: [], timeout=0.05, every=0.01, what="the run to finish")
    with pytest.raises(AssertionError, match=r"^ready: .*\(last seen: False\)"):
        eventually(ready, timeout=0.05, every=0.01)
    assert next(counter) >= 2  # polled more than once before giving up


def test_consistently_passes_when_the_check_holds_throughout() -> None:
    calls = itertools.count()
    consistently(lambda: next(calls) >= 0, duration=0.05, every=0.01)
    assert next(calls) >= 3


def test_consistently_fails_at_the_first_false_moment() -> None:
    values = iter([True, True, 0, True])
    with pytest.raises(AssertionError, match=r"stays paused: stopped holding .*\(seen: 0\)"):
        consistently(lambda: next(values), duration=5, every=0.001, what="stays paused")
