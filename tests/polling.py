"""Waiting in tests for something another thread or process does.

The one place tests wait: `eventually` for "this comes true", `consistently` for "this stays
true for a while". A test that needs a fixed pause should say in a comment why no condition fits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    check: Callable[[], T],
    timeout: float = 30.0,
    every: float = 0.1,
    *,
    what: str | None = None,
) -> T:
    """Poll until `check()` is truthy and return that value; fail with what was awaited otherwise.

    `check` runs at least once, and once more at the deadline, so a slow poll is not cut short.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{_described(check, what)}: not met within {timeout}s (last seen: {last!r})"
            )
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))


def consistently(
    check: Callable[[], object],
    duration: float,
    every: float = 0.1,
    *,
    what: str | None = None,
) -> None:
    """Poll `check()` for `duration` seconds; fail at the first moment it is falsy.

    For "nothing else happens" checks: a paused schedule fires nothing, a run stays pending.
    """
    start = time.monotonic()
    deadline = start + duration
    while True:
        seen = check()
        if not seen:
            raise AssertionError(
                f"{_described(check, what)}: stopped holding after {time.monotonic() - start:.2f}s"
                f" of {duration}s (seen: {seen!r})"
            )
        now = time.monotonic()
        if now >= deadline:
            return
        time.sleep(min(every, deadline - now))


def _described(check: Callable[[], object], what: str | None) -> str:
    """The failure's subject: the caller's words, else the check's name if it has a real one."""
    if what:
        return what
    name = getattr(check, "__name__", "")
    return name if name and name != "<lambda>" else "condition"
