"""A run whose publish failed because Redis was down is published by the relay's first sweep
once Redis is back, not a dispatch grace later: the failed publish hands the run back to the
relay. Real Redis (the session's own, stopped and started on its port), real publisher."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime

import pytest
import redis
from sqlalchemy import Engine, select

from domain.clock import utc_now
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.runs import enqueue
from domain.runs.recovery import relay_once
from domain.runs.requests import build_request
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.settings import load_settings
from scheduler.schedule_runner import ScheduleRunner
from scheduler.triggers import Slots, TriggerSpec
from tests.polling import eventually
from tests.services import PrivateRedis
from worker.app import create_app
from worker.publisher import CeleryPublisher

pytestmark = pytest.mark.redis

#: Far longer than the test: only a run handed back to the relay can be published in time.
GRACE_S = 3600


@pytest.fixture
def publisher(redis_url: str) -> CeleryPublisher:
    return CeleryPublisher(create_app(load_settings(broker_url=redis_url)))


@pytest.fixture
def redis_down(redis_server: PrivateRedis) -> Iterator[PrivateRedis]:
    """The session's Redis, stopped for the test's first part; started again at the end."""
    redis_server.stop()
    try:
        yield redis_server
    finally:
        if redis_server.proc is None:
            redis_server.start()


def queued_ids(redis_url: str, queue: str = "default") -> list[str]:
    """Run ids of the conveyor.execute messages waiting in `queue` (at any priority: kombu
    keeps one list per level, `default:4` for conveyor's 5)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [queue, *client.scan_iter(f"{queue}:*")]
        return [json.loads(m)["headers"]["id"] for k in keys for m in client.lrange(k, 0, -1)]
    finally:
        client.close()


def dispatch_state(engine: Engine, run_id: object) -> tuple[datetime | None, int]:
    with engine.connect() as conn:
        row = conn.execute(
            select(runs.c.dispatched_at, runs.c.dispatch_attempts).where(runs.c.id == run_id)
        ).one()
    return row[0], row[1]


def test_an_enqueue_published_while_redis_is_down_is_relayed_once_it_is_back(
    engine: Engine, publisher: CeleryPublisher, redis_down: PrivateRedis, redis_url: str
) -> None:
    run = enqueue.enqueue(UnitOfWork(engine), build_request(name="t"), publisher=publisher).run
    assert dispatch_state(engine, run.id) == (None, 0)  # the relay's to publish
    down = relay_once(engine, publisher, clock=utc_now, grace_s=GRACE_S)
    assert down.published == 0  # still down: nothing is marked
    redis_down.start()
    back = relay_once(engine, publisher, clock=utc_now, grace_s=GRACE_S)
    assert (back.published, back.republished) == (1, 0)
    assert queued_ids(redis_url) == [str(run.id)]
    sent_at, attempts = dispatch_state(engine, run.id)
    assert sent_at is not None and attempts == 1


def test_a_scheduled_run_published_while_redis_is_down_is_relayed_once_it_is_back(
    engine: Engine, publisher: CeleryPublisher, redis_down: PrivateRedis, redis_url: str
) -> None:
    spec = sched.ScheduleInput.parse(name="tick", target="t", trigger="interval", expression="1s")
    view = manage.add_schedule(
        UnitOfWork(engine), spec, Slots(TriggerSpec("interval", "1s")), now=utc_now()
    )
    runner = ScheduleRunner(engine, publisher, misfire_grace_s=60)
    runner.start()
    try:
        eventually(lambda: bool(scheduled(engine, view.id)), timeout=15)
    finally:
        runner.stop()
    made = scheduled(engine, view.id)
    assert all(dispatch_state(engine, run_id) == (None, 0) for run_id in made)
    redis_down.start()
    back = relay_once(engine, publisher, clock=utc_now, grace_s=GRACE_S)
    assert back.published == len(made)
    assert sorted(queued_ids(redis_url)) == sorted(str(r) for r in made)


def scheduled(engine: Engine, schedule_id: int) -> list[object]:
    with engine.connect() as conn:
        ref = f"schedule:{schedule_id}"
        return list(conn.execute(select(runs.c.id).where(runs.c.trigger_ref == ref)).scalars())
