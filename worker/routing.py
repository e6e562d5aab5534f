"""What conveyor's messages are called on the broker, and how its priorities map onto the
broker's."""

from __future__ import annotations

EXECUTE = "conveyor.execute"


SUBMIT = "conveyor.submit"


PRIORITY_LEVELS = 10


def priority_for_broker(broker_url: str, priority: int) -> int:
    """conveyor's priority (9 = most urgent) in the broker's terms.

    kombu's Redis transport serves priority 0 first, RabbitMQ serves the highest number first.
    """
    if broker_url.startswith(("redis", "rediss", "memory", "sentinel")):
        return PRIORITY_LEVELS - 1 - priority
    return priority
