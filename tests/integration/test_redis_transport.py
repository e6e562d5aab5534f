"""The worker's Redis transport: one client per channel and pool; run deliveries tracked in
memory only (still counted for prefetch, still put back on reject and at shutdown); every other
message keeps kombu's full bookkeeping of unacked messages."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Message, Queue

from domain.settings import load_settings
from worker.app import create_app
from worker.redis_transport import Transport
from worker.routing import EXECUTE

pytestmark = pytest.mark.redis


@pytest.fixture
def connection(redis_url: str) -> Iterator[Connection]:
    app = create_app(load_settings(broker_url=redis_url))
    with app.connection_for_read() as conn:
        yield conn


def test_the_worker_app_uses_it_for_redis_urls(connection: Connection) -> None:
    assert isinstance(connection.transport, Transport)
    memory = create_app(load_settings(broker_url="memory://"))
    with memory.connection_for_read() as conn:
        assert not isinstance(conn.transport, Transport)


def test_one_client_per_channel_and_a_new_one_for_a_new_pool(connection: Connection) -> None:
    # `_create_client` is kombu's hook that our Channel overrides: the only place to see it.
    channel = connection.default_channel
    first = channel._create_client()
    assert channel._create_client() is first
    channel._disconnect_pools()  # what kombu does after a fork
    renewed = channel._create_client()
    assert renewed is not first
    assert renewed.connection_pool is channel._pool
    assert channel._create_client(asynchronous=True) is not renewed  # BRPOP keeps its own


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client, to see what the transport left in Redis."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def queue(connection: Connection, raw: redis.Redis) -> Iterator[Queue]:
    name = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    yield Queue(name, routing_key=name)
    raw.delete(name)


def deliver(connection: Connection, queue: Queue, task: str, prefetch: int = 0) -> Message:
    """Publish one message for `task` and take delivery of it (not acked yet)."""
    with connection.Producer() as producer:
        producer.publish({"n": 1}, routing_key=queue.name, declare=[queue], headers={"task": task})
    return take(connection, queue, prefetch)


def take(connection: Connection, queue: Queue, prefetch: int = 0) -> Message:
    got: list[Message] = []
    consumer = connection.Consumer(queue, callbacks=[lambda body, msg: got.append(msg)])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    connection.drain_events(timeout=5)
    consumer.cancel()
    assert [m.payload for m in got] == [{"n": 1}]
    return got[0]


def test_other_messages_are_tracked_in_redis_until_acked(
    connection: Connection, queue: Queue, raw: redis.Redis
) -> None:
    channel = connection.default_channel
    message = deliver(connection, queue, "conveyor.submit")
    tag = message.delivery_tag
    assert raw.hexists(channel.unacked_key, tag)  # tracked, through the shared client
    message.ack()
    assert not raw.hexists(channel.unacked_key, tag)
    assert raw.zscore(channel.unacked_index_key, tag) is None


def test_a_run_delivery_is_tracked_in_memory_and_counts_for_prefetch(
    connection: Connection, queue: Queue, raw: redis.Redis
) -> None:
    channel = connection.default_channel
    message = deliver(connection, queue, EXECUTE, prefetch=1)
    tag = message.delivery_tag
    assert not raw.hexists(channel.unacked_key, tag)
    assert raw.zscore(channel.unacked_index_key, tag) is None
    assert not channel.qos.can_consume()  # the one prefetch slot is taken
    message.ack()
    assert channel.qos.can_consume()


def test_a_rejected_run_delivery_goes_back_to_its_queue(
    connection: Connection, queue: Queue, raw: redis.Redis
) -> None:
    message = deliver(connection, queue, EXECUTE)
    assert raw.llen(queue.name) == 0
    message.reject(requeue=True)
    assert raw.llen(queue.name) == 1
    again = take(connection, queue)
    assert again.headers["redelivered"] is True
    again.reject()  # without requeue: gone
    assert raw.llen(queue.name) == 0


def test_run_deliveries_held_at_shutdown_go_back_to_their_queue(
    connection: Connection, queue: Queue, raw: redis.Redis
) -> None:
    deliver(connection, queue, EXECUTE)
    other = deliver(connection, queue, "conveyor.submit")
    assert raw.llen(queue.name) == 0
    connection.default_channel.qos.restore_unacked()
    assert raw.llen(queue.name) == 2
    assert not raw.hexists(connection.default_channel.unacked_key, other.delivery_tag)
