"""The broker URL decides: the same worker and client on RabbitMQ instead of Redis."""

from __future__ import annotations

import base64
import signal
import socket
import uuid
from pathlib import Path

import amqp
import pytest
from sqlalchemy import select

from domain.db.models import dead_letters
from tests.e2e.stack import Stack
from tests.polling import eventually
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


@pytest.mark.skipif(not _rabbit_up() and not IN_CI, reason="RabbitMQ is not running here")
def test_poison_on_rabbitmq_is_dead_lettered_and_the_worker_lives_on(
    pg_url: str, tmp_path: Path
) -> None:
    """Raw AMQP messages a Celery client would never send: each is a dead letter with its bytes
    and reason (the consumer's checks hold for every broker), and the worker runs on."""
    stack = Stack(pg_url, tmp_path, AMQP)
    queue = f"rabbit-poison-{uuid.uuid4().hex[:12]}"  # a queue of its own, deleted at the end
    worker = stack.worker(queue, name="rabbit-poison")
    task_id = str(uuid.uuid4())
    poisons = [
        (b"hello", {}, None, "not a Celery task message"),
        (b'{"a": 1}', {"task": "conveyor.submit", "id": task_id}, "application/json", "[args"),
        (b"[[], {}, {}]", {"task": "nope", "id": str(uuid.uuid4())}, "application/json", "'nope'"),
        (b"\x80\x04K\x01.", {"task": "conveyor.submit", "id": str(uuid.uuid4())},
         "application/x-python-serialize", "not accepted"),
    ]  # fmt: skip
    try:
        with stack.client() as client:
            first = client.enqueue("noop", queue=queue)  # the worker has declared its queue
            assert client.wait(first.id, timeout=60).status == "succeeded"
            connection = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
            connection.connect()
            channel = connection.channel()
            for body, headers, content_type, _ in poisons:
                message = amqp.Message(body, application_headers=headers, content_type=content_type)
                channel.basic_publish(message, exchange="", routing_key=queue)
            connection.close()
            with client.engine.connect() as conn:

                def letters() -> list[dict[str, object]]:
                    query = select(dead_letters).order_by(dead_letters.c.id)
                    return [dict(r) for r in conn.execute(query).mappings()]

                eventually(lambda: len(letters()) == len(poisons), timeout=60)
                for (body, _, _, reason), row in zip(poisons, letters(), strict=True):
                    assert reason in str(row["reason"]), row["reason"]
                    assert base64.b64decode(row["body"]["raw"]) == body  # type: ignore[index]
            assert worker.poll() is None
            again = client.enqueue("noop", queue=queue)
            assert client.wait(again.id, timeout=60).status == "succeeded"
    finally:
        stack.kill(worker, signal.SIGTERM)
        connection = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        connection.connect()
        connection.channel().queue_delete(queue)
        connection.close()
