"""The in-process broker of `conveyor dev` (kombu's memory transport): a task message Celery
cannot unpack, or for a task nobody registered, is a dead letter, and the worker goes on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from kombu.transport.memory import Channel as MemoryChannel
from sqlalchemy import create_engine, select

from domain.db.models import dead_letters, runs
from domain.settings import load_settings
from tests.polling import eventually
from worker.app import create_app
from worker.routing import SUBMIT
from worker.runtime import close_runtime


@pytest.fixture
def worker_app(sqlite_url: str) -> Iterator[Any]:
    settings = load_settings(
        database_url=sqlite_url, broker_url="memory://", task_modules="tests.e2e.worker_tasks"
    )
    app = create_app(settings)
    # kombu's memory transport keeps its queues in one dict for the whole process: start from
    # empty ones, not from what an earlier test left on "celery" or "default".
    MemoryChannel.queues.clear()
    with start_worker(
        app,
        pool="solo",
        queues=["default", "celery"],
        perform_ping_check=False,
        shutdown_timeout=30,
    ):
        yield app
    close_runtime()  # a solo pool sends no worker_process_shutdown


def reasons(url: str) -> list[str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        found = list(conn.execute(select(dead_letters.c.reason)).scalars())
    engine.dispose()
    return found


def test_poison_on_the_memory_broker_is_dead_lettered(worker_app: Any, sqlite_url: str) -> None:
    with worker_app.producer_or_acquire() as producer:
        for headers, body in [
            ({"task": SUBMIT}, {"a": 1}),  # issue 16's crash loop: no id, a dict for a body
            ({"task": SUBMIT, "id": str(uuid.uuid4())}, [[], "kwargs", {}]),
            ({"task": "nope", "id": str(uuid.uuid4())}, [[], {}, {}]),
        ]:
            producer.publish(body, routing_key="celery", headers=headers, serializer="json")
    eventually(lambda: len(reasons(sqlite_url)) == 3, timeout=30)
    found = reasons(sqlite_url)
    assert any("headers.id" in r for r in found)
    assert any("[args, kwargs, embed]" in r for r in found)
    assert any("unregistered task 'nope'" in r for r in found)
    worker_app.send_task(SUBMIT, kwargs={"name": "noop", "params": {"i": 7}})
    engine = create_engine(sqlite_url)

    def succeeded() -> bool:
        with engine.connect() as conn:
            return conn.execute(select(runs.c.status)).scalars().all() == ["succeeded"]

    try:
        eventually(succeeded, timeout=30)
    except AssertionError:
        with engine.connect() as conn:
            rows = conn.execute(select(runs.c.name, runs.c.status, runs.c.error)).all()
        raise AssertionError(f"runs: {rows}; dead letters: {reasons(sqlite_url)}") from None
    engine.dispose()
