"""What the API asks the broker: is it reachable, and how many messages wait per queue."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from worker.routing import PRIORITY_LEVELS

# kombu's Redis transport keeps priority p (1-9) of queue q in the list "q:p", p=0 in "q".
SEP = ":"


def queue_keys(queue: str) -> list[str]:
    return [queue] + [f"{queue}{SEP}{p}" for p in range(1, PRIORITY_LEVELS)]


def queue_depths(redis: Any, queues: Sequence[str]) -> dict[str, int]:
    """LLEN of every priority list of every queue, in one round trip. OSError when Redis
    cannot be reached (redis-py's errors are wrapped so callers handle one kind)."""
    try:
        pipe = redis.pipeline(transaction=False)
        for queue in queues:
            for key in queue_keys(queue):
                pipe.llen(key)
        lengths = pipe.execute()
    except RedisError as exc:
        raise OSError(f"redis: {exc}") from None
    depths: dict[str, int] = {}
    per_queue = PRIORITY_LEVELS
    for index, queue in enumerate(queues):
        depths[queue] = sum(int(n) for n in lengths[index * per_queue : (index + 1) * per_queue])
    return depths


def ping(redis: Any, broker_url: str) -> None:
    """Raise OSError when the broker does not answer. Redis gets a PING; other brokers
    (amqp) a TCP connect, which is what "reachable" can mean without a client session."""
    if redis is not None:
        try:
            redis.ping()
        except RedisError as exc:
            raise OSError(f"redis: {exc}") from None
        return
    parts = urlsplit(broker_url)
    port = parts.port or {"amqp": 5672, "amqps": 5671}.get(parts.scheme, 5672)
    with socket.create_connection((parts.hostname or "localhost", port), timeout=2):
        pass
