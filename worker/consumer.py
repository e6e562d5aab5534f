"""The worker's consumer (Celery's `worker_consumer` setting): task events sent in batches.

Celery buffers task events (received, started, succeeded, ...) and publishes the buffer as one
`task.multi` message, but it flushes on every turn of the event loop: under load that is one
Redis PUBLISH round trip per task or two, about a third of the consumer process's time. Here a
flush waits up to EVENT_FLUSH_S for company (Celery still flushes at once when its buffer holds
24 events), so monitors such as Flower see every event, at most that much later.
"""

from __future__ import annotations

import contextlib
from typing import Any

from celery.worker.consumer import Consumer

EVENT_FLUSH_S = 0.05


class ConveyorConsumer(Consumer):  # type: ignore[misc]
    _flush_pending = False

    def on_send_event_buffered(self) -> None:
        if self.hub is None or self._flush_pending:
            return
        self._flush_pending = True
        self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._flush_pending = False
        self._flush_events()

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        # Events still waiting for their flush go out before the connection closes.
        with contextlib.suppress(Exception):  # shutting down: not worth a traceback
            self._flush_events()
        super().shutdown(*args, **kwargs)
