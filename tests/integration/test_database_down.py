"""A database that is down gives a clear message, credentials masked, and writes nothing."""

from __future__ import annotations

import pytest

from domain.db.engine import create_db_engine, wait_for_database
from domain.db.unit_of_work import UnitOfWork
from domain.errors import DatabaseUnavailable
from domain.runs import enqueue
from domain.runs.requests import build_request

DOWN_URL = "postgresql+psycopg://conveyor:s3cret-pw@127.0.0.1:1/conveyor"


def test_enqueue_against_a_down_database_is_a_clear_error() -> None:
    engine = create_db_engine(DOWN_URL)
    with pytest.raises(DatabaseUnavailable) as info:
        enqueue.enqueue(UnitOfWork(engine), build_request(name="t"))
    message = str(info.value)
    assert (
        "cannot reach the database postgresql+psycopg://conveyor:***@127.0.0.1:1/conveyor"
        in message
    )
    assert "s3cret-pw" not in message
    engine.dispose()


def test_wait_for_database_retries_with_backoff_then_gives_up() -> None:
    engine = create_db_engine(DOWN_URL, null_pool=True)
    sleeps: list[float] = []
    now = [0.0]

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    with pytest.raises(DatabaseUnavailable, match=r"gave up after \d+ attempts over 10s"):
        wait_for_database(engine, timeout_s=10, sleep=fake_sleep, monotonic=lambda: now[0])
    assert sleeps[:4] == [0.2, 0.4, 0.8, 1.6]  # exponential backoff
    assert sum(sleeps) == pytest.approx(10)
    engine.dispose()
