"""kombu's Redis transport, lightened where conveyor's database already does the broker's job.

Two changes, each found by profiling a worker's consumer process (the figures, dated, are in
bench/RESULTS.md), and one guard, all for `redis://` brokers only (worker/app.py); other schemes
keep kombu's own:

- **One client per channel.** kombu's Redis channel builds a new `redis.Redis` for every
  delivered message and every ack. Building one copies redis-py's table of ~200 response
  callbacks into a fresh case-insensitive dict, a large share of the consumer's CPU. A Redis
  client is a thin, thread-safe front of its connection pool, so one per channel and pool does
  the same work: commands still take a connection from the pool, and a pool kombu replaces
  (after a fork or a reconnect) gets a client of its own.
- **No Redis bookkeeping for run deliveries.** kombu emulates AMQP acks on Redis: every
  delivered message is copied into an "unacked" hash and index (one MULTI/EXEC) and removed
  again on ack (another), so that a worker that dies holding it has it restored after the
  visibility timeout. conveyor acks on receipt, and a `conveyor.execute` message only carries
  a run id: the run's row is the delivery intent, and the relay re-publishes a run that was
  published but not claimed within `dispatch_grace_s` (guarantee 1), long before the
  visibility timeout. The two transactions cost the consumer much of its CPU for nothing, so run
  deliveries are tracked in memory only: the prefetch limit still counts them, and a reject
  with requeue or a warm shutdown still puts them back on their queue. Every other message
  (`conveyor.submit` from plain Celery clients carries work that has no row yet) keeps kombu's
  full bookkeeping.
- **No poison gets through.** kombu decodes each popped item inside its BRPOP read and raises
  out of the worker's event loop on bytes that are not JSON, or on JSON it cannot make a
  message of (a missing delivery tag, bad base64): one `redis-cli lpush celery hello` ended
  the worker. Here such an item becomes a refused envelope (worker/poison.py) on the same
  queue, which the consumer dead-letters with the item's bytes. The bytes are caught on their
  way through redis-py's BRPOP reply callback and kept only until kombu has decoded them, so
  nothing is decoded twice.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str

from worker.poison import envelope_problem, refused_envelope
from worker.routing import EXECUTE

log = structlog.get_logger("conveyor.worker")


class QoS(kombu_redis.QoS):  # type: ignore[misc]  # kombu is untyped
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Delivery tags of run deliveries, tracked in memory only.
        self._runs: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if message.headers.get("task") == EXECUTE:
            self._runs.add(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # counted for the prefetch limit
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if delivery_tag in self._runs:
            self._runs.discard(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if delivery_tag in self._runs:
            if requeue:
                self._put_back(self._delivered[delivery_tag], leftmost=True)
            self.ack(delivery_tag)  # as kombu's reject: done with it either way
        else:
            super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> None:
        """At shutdown: run deliveries go back from memory, the rest from kombu's hash. One
        that cannot be put back is left to the relay; kombu's restore runs whatever happens."""
        self._flush()
        try:
            for tag in [t for t in self._delivered if t in self._runs]:
                try:
                    self._put_back(self._delivered.pop(tag))
                except Exception as exc:
                    log.warning("worker.restore_failed", reason=str(exc), next="the relay")
            self._runs.clear()
        finally:
            super().restore_unacked(client)

    def _put_back(self, message: Any, leftmost: bool = False) -> None:
        info = message.delivery_info
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            self.channel._do_restore_message(
                message._raw, info["exchange"], info["routing_key"], pipe, leftmost
            )
            pipe.execute()


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's BRPOP client: kombu makes it once already
            client = super()._create_client(asynchronous=True)
            client.set_response_callback("BRPOP", self._keep_popped)
            return client
        client = self._shared_client
        if client is None or client.connection_pool is not self._pool:
            client = self._shared_client = super()._create_client()
        return client

    def _keep_popped(self, response: Any, **_: Any) -> Any:
        """BRPOP's reply, as redis-py's own callback gives it; the popped item is also kept on
        the transport until kombu has decoded it (see Transport._deliver)."""
        if not response:
            return None
        key, item = response
        # The queue's name, as kombu's BRPOP read takes it from the list's (priority) key.
        self.connection.popped = (bytes_to_str(key).rsplit(self.sep, 1)[0], item)
        return tuple(response)

    def _brpop_read(self, **options: Any) -> Any:
        transport = self.connection
        try:
            return super()._brpop_read(**options)
        except Exception as exc:
            popped = transport.popped
            if popped is None:
                raise  # nothing was popped (Empty, a lost connection), or it was delivered
            transport.popped = None
            queue, raw = popped
            reason = f"not a JSON message: {type(exc).__name__}: {exc}"
            transport._deliver(refused_envelope(raw, reason, queue), queue)
            return True
        finally:
            transport.popped = None


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
    #: (queue, bytes) of the item a BRPOP popped, until kombu has decoded it.
    popped: tuple[str, bytes] | None = None

    def _deliver(self, message: Any, queue: str) -> None:
        """Every delivery passes here once decoded: one kombu could not make a message of is
        replaced by a refused envelope for the consumer to dead-letter."""
        popped, self.popped = self.popped, None
        problem = envelope_problem(message)
        if problem is not None:
            if popped is not None:
                raw = popped[1]
            else:  # a fanout message: its bytes are gone, their JSON is what is left
                raw = json.dumps(message, default=repr).encode("utf-8", "surrogatepass")
            message = refused_envelope(raw, f"malformed message: {problem}", queue)
        super()._deliver(message, queue)
