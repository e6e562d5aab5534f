"""The Celery app, built by a factory from Settings; nothing connects at import time."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from domain.settings import Settings
from worker.routing import PRIORITY_LEVELS, priority_for_broker


def create_app(settings: Settings) -> Celery:
    """A Celery app for `settings.broker_url`: JSON only, prefetch 1, events on, early acks.

    Messages are acked on receipt (acks_late off): a run's ownership lives in the database lease,
    so a long run is never redelivered because it outlived the broker's visibility timeout, and
    a killed worker's run is recovered by the reaper, not by the broker.
    """
    app = Celery("conveyor", broker=settings.broker_url, set_as_current=False)
    # For the consumer (worker/consumer.py): where refused messages are dead-lettered.
    app.conveyor_settings = settings
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=False,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        # Task events published in batches rather than one Redis round trip per loop turn.
        worker_consumer="worker.consumer:ConveyorConsumer",
        # The run row is the "sent" record; a task-sent event would double every publish.
        task_send_sent_event=False,
        task_default_queue=settings.default_queue,
        task_queues=[Queue(settings.default_queue, routing_key=settings.default_queue)],
        task_create_missing_queues=True,
        task_default_priority=priority_for_broker(settings.broker_url, 5),
        # RabbitMQ honours priorities only on queues declared with x-max-priority.
        task_queue_max_priority=PRIORITY_LEVELS - 1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_transport_options={
            # Ten real levels (kombu's default is four buckets), served highest first.
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "sep": ":",
            "queue_order_strategy": "priority",
            "visibility_timeout": settings.broker_visibility_timeout_s,
        },
    )
    if settings.broker_url.startswith("redis://"):
        # kombu's transport, with one Redis client per channel rather than one per message.
        app.conf.broker_transport = "worker.redis_transport:Transport"
    from worker.scheduler_watch import watch_for_scheduler
    from worker.tasks import register

    register(app, settings)
    watch_for_scheduler(app, settings)
    return app
