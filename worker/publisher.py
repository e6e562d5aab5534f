"""Publishing runs to Celery: the `Publisher` port's real implementation."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TypeVar

import redis
import structlog
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from domain.errors import BrokerUnavailable
from domain.ports import Dispatch
from domain.security.masking import NO_SECRETS, Masker
from domain.settings import redact_url
from worker.messages import display_headers
from worker.routing import EXECUTE, priority_for_broker

log = structlog.get_logger("conveyor.publisher")
T = TypeVar("T")

_ID, _TAG, _QUEUE, _PRIORITY = "@@ID@@", "@@TAG@@", "@@QUEUE@@", 987654321
#: Placeholders for the headers worker/messages.py builds (filled JSON-escaped).
_SHOWN = {"shadow": "@@SHADOW@@", "argsrepr": "@@ARGSREPR@@", "kwargsrepr": "@@KWARGSREPR@@"}


class CeleryPublisher:
    """Sends `conveyor.execute(run_id)` messages for runs, shown to Celery's tools under the
    run's task name, with its params (worker/messages.py).

    On Redis a batch is one pipeline with one LPUSH per queue key, and each message is filled
    into a template that Celery itself built (`as_task_v2`, protocol 2 in kombu's Redis
    envelope): building each message through `send_task` would make building messages, not
    PostgreSQL, the limit of enqueue_many. Other brokers go through kombu's own
    batch publishing. Messages use the default exchange, straight to the queue.

    A broker that cannot be reached raises BrokerUnavailable: the runs are already committed,
    and the relay publishes them later.
    """

    def __init__(self, app: Celery, *, batch_size: int = 1000, masker: Masker = NO_SECRETS) -> None:
        self.app = app
        self.batch_size = batch_size
        self.masker = masker  # secret values the shown params must not carry
        settings = getattr(app, "conveyor_settings", None)
        #: Fair share (domain/flow/fair.py): the published, unclaimed runs a queue may have.
        self.in_flight_limit: int = settings.dispatch_in_flight if settings is not None else 0
        self._broker = str(app.conf.broker_url or "")
        self._redis: redis.Redis | None = None
        self._setup_lock = threading.Lock()
        self._template: str | None = None
        # Delivery tags only need to be unique per message; a random start keeps two
        # publishers re-sending the same run apart.
        self._tags = itertools.count(int.from_bytes(os.urandom(6), "big"))

    def publish(self, dispatches: Sequence[Dispatch]) -> None:
        if dispatches:
            self.prepare(dispatches)()

    def prepare(self, dispatches: Sequence[Dispatch]) -> Callable[[], None]:
        """Build the messages now; the returned function sends them (BrokerUnavailable when the
        broker cannot be reached). Batch enqueues build them while PostgreSQL is still busy."""
        if not self._broker.startswith(("redis://", "rediss://", "unix://")):
            return lambda: self._guarded(lambda: self._publish_kombu(dispatches))
        by_key = self._guarded(lambda: self._messages(dispatches))
        return lambda: self._guarded(lambda: self._push(by_key))

    def _guarded(self, action: Callable[[], T]) -> T:
        try:
            return action()
        except (KombuOperationalError, RedisError, ConnectionError, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot reach the broker {redact_url(self._broker)}: {exc}"
            ) from None

    # -- Redis: templated messages, one pipeline --------------------------------------------
    def _messages(self, dispatches: Sequence[Dispatch]) -> dict[str, list[str]]:
        """The messages by Redis list key (queue, with kombu's priority suffix)."""
        if self._template is None:
            self._connect()
        by_key: dict[str, list[str]] = defaultdict(list)
        for d in dispatches:
            priority = priority_for_broker(self._broker, d.priority)
            key = d.queue if priority == 0 else f"{d.queue}:{priority}"
            by_key[key].append(self._message(d, priority))
        return by_key

    def _push(self, by_key: dict[str, list[str]]) -> None:
        client = self._redis or self._connect()
        with client.pipeline(transaction=False) as pipe:
            for key, messages in by_key.items():
                for start in range(0, len(messages), self.batch_size):
                    pipe.lpush(key, *messages[start : start + self.batch_size])
            pipe.execute()

    def _connect(self) -> redis.Redis:
        """The client, made on first use. Threads may publish at once (the API serves requests
        from a threadpool): the client is published only after the templates exist."""
        with self._setup_lock:
            if self._redis is None:
                client = redis.Redis.from_url(
                    self._broker, socket_connect_timeout=2, socket_timeout=5
                )
                self._build_templates()
                self._redis = client
            return self._redis

    def _build_templates(self) -> None:
        task = self.app.amqp.as_task_v2(_ID, EXECUTE, args=[_ID], **_SHOWN)
        envelope = {
            # The JSON body as text, without kombu's default base64 wrapping: a message with
            # no `body_encoding` is read as it is (kombu's virtual Channel.decode_body), and
            # encoding each body cost more than filling the rest of the template.
            "body": json.dumps(task.body),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": dict(task.headers),
            "properties": {
                "correlation_id": _ID,
                "reply_to": task.properties.get("reply_to") or "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": _QUEUE},
                "priority": _PRIORITY,
                "delivery_tag": _TAG,
            },
        }
        # One %-format per message instead of a search-and-replace per field.
        template = json.dumps(envelope).replace("%", "%%")
        for header, placeholder in _SHOWN.items():
            template = template.replace(placeholder, f"%({header})s")
        self._template = (
            template.replace(_ID, "%(id)s")
            .replace(_TAG, "%(tag)s")
            .replace(_QUEUE, "%(queue)s")
            .replace(str(_PRIORITY), "%(priority)d")
        )

    def _message(self, d: Dispatch, priority: int) -> str:
        assert self._template is not None
        run_id = str(d.run_id)
        shown = {
            header: json.dumps(value)[1:-1]  # inside a JSON string of the template
            for header, value in display_headers(d, self.masker).items()
        }
        return self._template % {
            "id": run_id,
            "tag": f"{run_id}.{next(self._tags):x}",
            "queue": d.queue,
            "priority": priority,
            **shown,
        }

    # -- other brokers: kombu's batch API ---------------------------------------------------
    def _publish_kombu(self, dispatches: Sequence[Dispatch]) -> None:
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
                    **display_headers(d, self.masker),
                )
