"""A lock that a forked child never inherits held.

`os.fork` copies a lock as it is: if another thread of the parent held it at that moment, the
child (which has only the forking thread) would wait for it forever. Celery's prefork pool
forks children from a consumer that runs threads of its own, and replaces children while they
run, so a lock that a forked child takes (the per-thread connections, the unconfirmed sends)
is one of these: each child starts with it free.
"""

from __future__ import annotations

import os
import threading
import weakref
from types import TracebackType


class ForkSafeLock:
    """`threading.Lock` for `with` blocks, renewed (free) in every forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _locks.add(self)

    def __enter__(self) -> ForkSafeLock:
        self._lock.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()

    def _renew(self) -> None:
        self._lock = threading.Lock()


_locks: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


def _renew_all() -> None:
    for lock in list(_locks):
        lock._renew()


os.register_at_fork(after_in_child=_renew_all)
