"""Publishing runs to Celery: the `Publisher` port's real implementation."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import threading
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import hiredis
import redis
import structlog
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError, ResponseError

from domain.db.engine import hung_up
from domain.errors import BrokerUnavailable
from domain.forks import ForkSafeLock
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

    `send_unconfirmed` publishes without waiting for Redis's reply (Redis pipelining across
    calls): a producer enqueueing one run at a time then waits for PostgreSQL only.
    """

    def __init__(self, app: Celery, *, batch_size: int = 1000, masker: Masker = NO_SECRETS) -> None:
        self.app = app
        self.batch_size = batch_size
        self.masker = masker  # secret values the shown params must not carry
        settings = getattr(app, "conveyor_settings", None)
        #: Fair share (domain/flow/fair.py): the published, unclaimed runs a queue may have.
        self.in_flight_limit: int = settings.dispatch_in_flight if settings is not None else 0
        self._broker = str(app.conf.broker_url or "")
        #: Redis gets the templated messages and one pipeline; other brokers kombu's API.
        self._on_redis = self._broker.startswith(("redis://", "rediss://", "unix://"))
        self._redis: redis.Redis | None = None
        self._setup_lock = threading.Lock()
        self._template: str | None = None
        # Delivery tags only need to be unique per message; a random start keeps two
        # publishers re-sending the same run apart.
        self._tags = itertools.count(int.from_bytes(os.urandom(6), "big"))
        self._unconfirmed = _UnconfirmedLines()
        _publishers.add(self)

    def publish(self, dispatches: Sequence[Dispatch]) -> None:
        if dispatches:
            self.prepare(dispatches)()

    def prepare(self, dispatches: Sequence[Dispatch]) -> Callable[[], None]:
        """Build the messages now; the returned function sends them (BrokerUnavailable when the
        broker cannot be reached). Batch enqueues build them while PostgreSQL is still busy."""
        if not self._on_redis:
            return lambda: self._guarded(lambda: self._publish_kombu(dispatches))
        by_key = self._guarded(lambda: self._messages(dispatches))
        return lambda: self._guarded(lambda: self._push(by_key))

    def send_unconfirmed(self, dispatches: Sequence[Dispatch], lost: Callable[[], None]) -> None:
        """Publish `dispatches` without waiting for the broker to confirm them: the commands are
        written on this thread's own Redis connection, and their replies read just before its
        next write there, or at `flush()`. Should those replies show that Redis did not take
        them (an error, or the connection gone), `lost()` is called then, in that thread.
        BrokerUnavailable when the commands cannot be written at all (nothing is pending
        then). Other brokers publish and confirm at once (`publish`)."""
        if not self._on_redis:
            self.publish(dispatches)
            return
        by_key = self._guarded(lambda: self._messages(dispatches))
        commands = [("LPUSH", key, *chunk) for key, chunk in self._lpushes(by_key)]
        client = self._redis or self._connect()
        self._guarded(lambda: self._unconfirmed.write(client, commands, lost))

    def flush(self) -> None:
        """Read the replies of every unconfirmed send (`lost()` for those Redis did not take).
        `Client.close()` calls it, and interpreter exit."""
        self._unconfirmed.settle_all()

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
            for key, chunk in self._lpushes(by_key):
                pipe.lpush(key, *chunk)
            pipe.execute()

    def _lpushes(self, by_key: dict[str, list[str]]) -> Iterator[tuple[str, list[str]]]:
        """Each LPUSH a send makes: a key and at most `batch_size` of its messages."""
        for key, messages in by_key.items():
            for start in range(0, len(messages), self.batch_size):
                yield key, messages[start : start + self.batch_size]

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
        shown = {  # inside a JSON string of the template: escaped as json.dumps escapes text
            header: _json_text(value)[1:-1]
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


_json_text: Callable[[str], str] = json.encoder.encode_basestring_ascii


class _Line:
    """One thread's Redis connection for unconfirmed sends, and what its replies will say."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection  # a redis-py Connection of the publisher's client's kind
        self.lock = threading.Lock()  # its thread, or a flush from another
        #: Per earlier write: how many replies it awaits, and whom to tell if it was lost.
        self.pending: deque[tuple[int, Callable[[], None]]] = deque()

    def __del__(self) -> None:
        # Its thread has ended: close the socket now. redis-py's connections sit in reference
        # cycles, so left alone it waits for the garbage collector (which warns).
        with contextlib.suppress(Exception):
            self.connection.disconnect()

    def settle(self) -> None:
        """(Under the lock.) Read the replies of the earlier writes; tell each lost one. Each
        reply is read, an error among them included, so the next write's replies stay in
        step; a connection that fails loses everything it still awaited."""
        while self.pending:
            count, lost = self.pending[0]
            failed = False
            try:
                for _ in range(count):
                    try:
                        self.connection.read_response()
                    except ResponseError:  # an error reply (say WRONGTYPE): the next is read
                        failed = True
            except (RedisError, ConnectionError, OSError):
                self.connection.disconnect()
                gone = list(self.pending)
                self.pending.clear()
                for _, told in gone:
                    _tell(told)
                return
            self.pending.popleft()
            if failed:
                _tell(lost)


def _tell(lost: Callable[[], None]) -> None:
    try:
        lost()
    except Exception:  # a failing hand-back must not stop the replies being read
        log.exception("publisher.lost_callback_failed")


class _UnconfirmedLines:
    """The unconfirmed-send connections of one publisher: one per thread (a connection cannot
    interleave two threads' commands), each flushed on demand; a forked child opens its own.
    A thread's line goes with the thread (its last replies unread: those runs, if Redis did
    not take them, the relay sends after its grace)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lines: weakref.WeakSet[_Line] = weakref.WeakSet()
        self._lock = ForkSafeLock()  # a child forked while a thread held it starts with it free
        self._pid = os.getpid()

    def write(
        self, client: redis.Redis, commands: list[tuple[str, ...]], lost: Callable[[], None]
    ) -> None:
        line = self._line(client)
        with line.lock:
            line.settle()
            sock = getattr(line.connection, "_sock", None)
            if sock is not None and hung_up(sock.fileno()):
                # Nothing is awaited, so Redis has closed it (a restart, its idle `timeout`):
                # a write now would be lost unseen until the next send. Open a new one.
                line.connection.disconnect()
            try:
                # hiredis packs as redis-py's own packer does (UTF-8), without its per-argument
                # checks, which cost more than the rest of a single enqueue's send. (Its stub
                # types the command as a tuple of one element.)
                packed = [hiredis.pack_command(c) for c in commands]  # type: ignore[arg-type]
                line.connection.send_packed_command(packed)
            except BaseException:
                line.connection.disconnect()  # some commands may have gone out: none await
                raise
            line.pending.append((len(commands), lost))

    def settle_all(self) -> None:
        if self._pid != os.getpid():
            return
        with self._lock:
            lines = list(self._lines)
        for line in lines:
            with line.lock:
                line.settle()

    def _line(self, client: redis.Redis) -> _Line:
        if self._pid != os.getpid():  # forked: the parent's connections and replies are its own
            self._pid = os.getpid()
            self._local = threading.local()
            with self._lock:
                self._lines = weakref.WeakSet()
        line: _Line | None = getattr(self._local, "line", None)
        if line is None:
            pool = client.connection_pool
            line = _Line(pool.connection_class(**pool.connection_kwargs))
            self._local.line = line
            with self._lock:
                self._lines.add(line)
        return line


_publishers: weakref.WeakSet[CeleryPublisher] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Replies unread at exit are read, so a run Redis refused goes back to the relay now."""
    for publisher in list(_publishers):
        try:
            publisher.flush()
        except Exception:  # exiting: the relay's grace still covers them
            log.exception("publisher.flush_at_exit_failed")
