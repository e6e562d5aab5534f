"""The worker's consumer (Celery's `worker_consumer` setting): task events sent in batches, and
no message that kills it.

Celery buffers task events (received, started, succeeded, ...) and publishes the buffer as one
`task.multi` message, but it flushes on every turn of the event loop: under load that is one
Redis PUBLISH round trip per task or two, about a third of the consumer process's time. Here a
flush waits up to EVENT_FLUSH_S for company (Celery still flushes at once when its buffer holds
24 events), so monitors such as Flower see every event, at most that much later.

Celery's task handler raises out of the event loop on a body it cannot unpack (one message
ended the worker, and came back from kombu's unacked bookkeeping to end the next one), and
rejects unknown tasks and undecodable bodies with a log line only. Here every message Celery
could not run is dead-lettered with its bytes and the reason, then acked (worker/poison.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import structlog
from celery.worker.consumer import Consumer

from worker.poison import REFUSED, Refusals, task_message_problem

log = structlog.get_logger("conveyor.worker")

EVENT_FLUSH_S = 0.05


class ConveyorConsumer(Consumer):  # type: ignore[misc]
    _flush_pending = False
    _refusals: Refusals | None = None

    @property
    def refusals(self) -> Refusals:
        if self._refusals is None:
            settings = self.app.conveyor_settings
            self._refusals = Refusals(settings.effective_database_url, self.timer.call_after)
        return self._refusals

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        refuse = self.refusals.refuse

        def on_task_received(message: Any) -> None:
            headers = message.headers
            if isinstance(headers, dict) and REFUSED in headers:
                return refuse(message, headers[REFUSED])
            problem = task_message_problem(message)
            if problem is not None:
                return refuse(message, f"malformed task message: {problem}")
            try:
                handle(message)
            except Exception as exc:  # a message Celery choked on must not end the worker
                reason = f"Celery could not take the message: {type(exc).__name__}: {exc}"
                if message.acknowledged:  # Celery had taken it: nothing left to dead-letter
                    log.error("message.failed", reason=reason)
                else:
                    refuse(message, reason)
            return None

        return on_task_received

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.refusals.refuse(message, "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        name = message.headers.get("task") if isinstance(message.headers, dict) else None
        self.refusals.refuse(message, f"unregistered task {name!r}: no task of that name here")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self.refusals.refuse(message, f"invalid task message: {exc}")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self.refusals.refuse(message, f"the message cannot be decoded: {type(exc).__name__}: {exc}")

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
        if self._refusals is not None:
            self._refusals.close()
        super().shutdown(*args, **kwargs)
