"""Publishing runs to Celery: the `Publisher` port's real implementation."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError

from domain.errors import BrokerUnavailable
from domain.ports import Dispatch
from domain.settings import redact_url
from worker.app import EXECUTE, priority_for_broker

log = structlog.get_logger("conveyor.publisher")


class CeleryPublisher:
    """Sends `conveyor.execute(run_id)` messages; a batch travels in one pipeline (kombu batch).

    Messages go through the default exchange straight to the queue, so the Redis transport needs
    no binding lookup per message. A broker that cannot be reached raises BrokerUnavailable: the
    runs are already committed, and the relay publishes them later.
    """

    def __init__(self, app: Celery, *, batch_size: int = 1000) -> None:
        self.app = app
        self.batch_size = batch_size
        self._broker = str(app.conf.broker_url or "")

    def publish(self, dispatches: Sequence[Dispatch]) -> None:
        if not dispatches:
            return
        try:
            with self.app.producer_or_acquire() as producer, producer.batch(self.batch_size):
                for d in dispatches:
                    self.app.send_task(
                        EXECUTE,
                        args=[str(d.run_id)],
                        task_id=str(d.run_id),
                        queue=d.queue,
                        exchange="",
                        routing_key=d.queue,
                        priority=priority_for_broker(self._broker, d.priority),
                        producer=producer,
                        retry=False,
                    )
        except (KombuOperationalError, RedisConnectionError, ConnectionError, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot reach the broker {redact_url(self._broker)}: {exc}"
            ) from None
