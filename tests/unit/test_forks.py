"""A lock held by another thread at a fork is free in the child (domain/forks.py)."""

from __future__ import annotations

import threading
from typing import Any

from domain.forks import ForkSafeLock
from tests.concurrent import exit_code_of_child, held_by_a_thread


def taking(lock: Any) -> None:
    with lock:
        pass


def test_a_child_forked_while_another_thread_holds_the_lock_can_take_it() -> None:
    lock = ForkSafeLock()
    release, thread = held_by_a_thread(lock)
    try:
        assert exit_code_of_child(lambda: taking(lock)) == 0
    finally:
        release.set()
        thread.join()
    taking(lock)  # the parent's own: free again once its thread let go


def test_a_plain_lock_would_hang_the_child() -> None:
    """What ForkSafeLock prevents (so that the test above can fail): the child waits forever."""
    lock = threading.Lock()
    release, thread = held_by_a_thread(lock)
    try:
        assert exit_code_of_child(lambda: taking(lock), timeout=1.0) is None
    finally:
        release.set()
        thread.join()
