"""The worker's Redis transport: one client per channel and pool, and kombu's bookkeeping of
unacked messages still complete (a delivered message is tracked until it is acked)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Queue

from domain.settings import load_settings
from tests.services import REDIS_URL, require_redis
from worker.app import create_app
from worker.redis_transport import Transport

pytestmark = pytest.mark.redis


@pytest.fixture
def connection() -> Iterator[Connection]:
    require_redis()
    app = create_app(load_settings(broker_url=REDIS_URL))
    with app.connection_for_read() as conn:
        yield conn


def test_the_worker_app_uses_it_for_redis_urls(connection: Connection) -> None:
    assert isinstance(connection.transport, Transport)
    memory = create_app(load_settings(broker_url="memory://"))
    with memory.connection_for_read() as conn:
        assert not isinstance(conn.transport, Transport)


def test_one_client_per_channel_and_a_new_one_for_a_new_pool(connection: Connection) -> None:
    channel = connection.default_channel
    first = channel._create_client()
    assert channel._create_client() is first
    channel._disconnect_pools()  # what kombu does after a fork
    renewed = channel._create_client()
    assert renewed is not first
    assert renewed.connection_pool is channel._pool
    assert channel._create_client(asynchronous=True) is not renewed  # BRPOP keeps its own


def test_a_delivered_message_is_tracked_until_acked(connection: Connection) -> None:
    name = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, routing_key=name)
    raw = redis.Redis.from_url(REDIS_URL)
    channel = connection.default_channel
    try:
        with connection.Producer() as producer:
            producer.publish({"n": 1}, routing_key=name, declare=[queue], serializer="json")
        got = []
        with connection.Consumer(queue, callbacks=[lambda body, msg: got.append(msg)]):
            connection.drain_events(timeout=5)
            assert [m.payload for m in got] == [{"n": 1}]
            tag = got[0].delivery_tag
            assert raw.hexists(channel.unacked_key, tag)  # tracked, through the shared client
            got[0].ack()
            assert not raw.hexists(channel.unacked_key, tag)
            assert raw.zscore(channel.unacked_index_key, tag) is None
    finally:
        raw.delete(name)
        raw.close()
