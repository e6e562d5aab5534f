"""The broker URL decides: the same worker and client on RabbitMQ instead of Redis."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.e2e.stack import Stack
from tests.services import IN_CI

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbit_up() and not IN_CI, reason="RabbitMQ is not running here")
def test_runs_flow_through_rabbitmq(pg_url: str, tmp_path: Path) -> None:
    stack = Stack(pg_url, tmp_path, AMQP)
    queue = f"rabbit-{tmp_path.name[-12:]}"
    worker = stack.worker(queue, name="rabbit")
    try:
        with stack.client() as client:
            runs = client.enqueue_many(
                {"name": "noop", "params": {"i": i}, "queue": queue, "priority": i % 10}
                for i in range(20)
            )
            finals = [client.wait(r.id, timeout=60) for r in runs]
        assert {f.status for f in finals} == {"succeeded"}
        assert sorted(f.result["i"] for f in finals) == list(range(20))
    finally:
        stack.kill(worker, signal.SIGTERM)
