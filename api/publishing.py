"""The API's publisher: the worker's CeleryPublisher, made safe for the threadpool that serves
requests."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from domain.ports import Dispatch, Publisher


class FirstCallSerialized:
    """CeleryPublisher connects and builds its message templates lazily on the first publish,
    and a second thread arriving meanwhile sees the connection but not yet the templates (an
    AssertionError after the run committed). The first call runs under a lock; after it, calls
    go straight through (the Redis client and the rest of publish() are thread-safe)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._lock = threading.Lock()
        self._warm = False

    def publish(self, dispatches: Sequence[Dispatch]) -> None:
        if not dispatches:
            return
        if self._warm:
            self.publisher.publish(dispatches)
            return
        with self._lock:
            self.publisher.publish(dispatches)
            self._warm = True
