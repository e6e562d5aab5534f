"""CeleryPublisher sets itself up on first use, and the API publishes from many threads."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from domain.errors import BrokerUnavailable
from domain.ports import Dispatch
from domain.settings import load_settings
from worker.app import create_app
from worker.publisher import CeleryPublisher

pytestmark = pytest.mark.redis


def test_threads_publishing_first_together_all_get_through(redis_url: str) -> None:
    """The first publishers arrive while the setup is still building its templates (slowed
    down here); none may see a half-made publisher, and every message must be sent."""
    client = redis.Redis.from_url(redis_url)
    client.delete("threads-q")
    publisher = CeleryPublisher(create_app(load_settings(broker_url=redis_url)))
    build = publisher._build_templates

    def slow_build() -> None:
        time.sleep(0.3)  # long enough for every thread to arrive during the setup
        build()

    publisher._build_templates = slow_build  # type: ignore[method-assign]
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def one() -> None:
        start.wait()
        try:
            publisher.publish([Dispatch(uuid.uuid4(), "t", "threads-q", 0)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert sum(client.llen(k) for k in client.keys("threads-q*")) == 8
    for key in client.keys("threads-q*"):
        client.delete(key)
    client.close()
    # A publisher lives as long as its process and has no close(); the test shuts its client.
    assert publisher._redis is not None
    publisher._redis.close()


def test_prepare_builds_without_the_broker_and_sending_says_it_is_down() -> None:
    """Messages are built before commit with no network; only sending needs the broker."""
    down = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    publisher = CeleryPublisher(create_app(load_settings(broker_url=down)))
    send = publisher.prepare([Dispatch(uuid.uuid4(), "t", "default", 5)])
    with pytest.raises(BrokerUnavailable, match=r"cannot reach the broker redis://127\.0\.0\.1:1"):
        send()
