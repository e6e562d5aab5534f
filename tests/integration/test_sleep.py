"""Durable sleep (`ctx.sleep`) on a real executor and database: the execution ends and the
run waits holding no worker, is claimable again only when due, goes on with the same attempt
past its completed steps, and a waiting run cancels at once."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from domain.clock import utc_now
from domain.db.models import Run, runs
from domain.db.unit_of_work import UnitOfWork
from domain.runs import control
from domain.runs.recovery import relay_once
from tests.fakes import FakePublisher
from tests.integration.conftest import Harness
from tests.polling import eventually


def _wake(h: Harness, run_id: uuid.UUID) -> None:
    """The sleep is over, without waiting for it."""
    with h.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(not_before=utc_now()))


def _row(h: Harness, run_id: uuid.UUID) -> Any:
    with h.engine.connect() as conn:
        return conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()


def test_a_sleeping_run_waits_without_a_worker_and_goes_on_where_it_slept(h: Harness) -> None:
    calls: Counter[str] = Counter()

    def fetch() -> int:
        calls["fetch"] += 1
        return 7

    @h.registry.task(max_attempts=1)
    def poll(ctx: Any) -> dict[str, Any]:
        value = ctx.step("fetch", fetch)
        calls["before sleep"] += 1
        ctx.sleep("400ms")
        calls["after sleep"] += 1
        return {"value": value, "attempt": ctx.attempt}

    run_id = h.enqueue("poll")
    before = utc_now()
    assert h.run(run_id) == "waiting"
    row = _row(h, run_id)
    assert (row["status"], row["wait_reason"], row["lease_owner"], row["attempt"]) == (
        "waiting",
        "sleep",
        None,
        1,
    )
    assert row["not_before"] >= before + timedelta(milliseconds=400)
    assert h.run(run_id) == "dropped"  # not due: no worker takes it before its time
    # Claimed again once due (each try before then is dropped): the same attempt goes on
    # (max_attempts=1), past a step that is not called again.
    eventually(lambda: h.run(run_id) == "succeeded", timeout=10, every=0.05)
    run = h.get(run_id)
    assert (run.attempt, run.result) == (1, {"value": 7, "attempt": 1})
    assert calls == {"fetch": 1, "before sleep": 2, "after sleep": 1}
    assert run.finished_at is not None and run.finished_at >= before + timedelta(milliseconds=400)


def test_a_sleep_until_a_time_that_has_passed_does_not_wait(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def late(ctx: Any) -> str:
        ctx.sleep_until(utc_now() - timedelta(seconds=1))
        ctx.sleep(0)
        return "went on"

    run_id = h.enqueue("late")
    assert h.run(run_id) == "succeeded"
    assert h.get(run_id).result == "went on"


def test_cancelling_a_waiting_run_ends_it_at_once(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def sleeper(ctx: Any) -> None:
        ctx.sleep("1d")

    run_id = h.enqueue("sleeper")
    assert h.run(run_id) == "waiting"
    cancelled = control.cancel_run(UnitOfWork(h.engine), run_id, actor="test")
    assert (cancelled.status, cancelled.finished_at is not None) == ("cancelled", True)
    _wake(h, run_id)
    assert h.run(run_id) == "dropped"


def test_the_relay_delivers_a_waiting_run_when_it_is_due(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def sleeper(ctx: Any) -> None:
        ctx.sleep("1h")

    run_id = h.enqueue("sleeper")
    assert h.run(run_id) == "waiting"
    publisher = FakePublisher()
    relay_once(h.engine, publisher, clock=utc_now, grace_s=30)
    assert publisher.published == []  # asleep: nothing to deliver yet
    _wake(h, run_id)
    relay_once(h.engine, publisher, clock=utc_now, grace_s=30)
    assert [d.run_id for d in publisher.published] == [run_id]
    relay_once(h.engine, publisher, clock=utc_now, grace_s=30)
    assert len(publisher.published) == 1  # marked as sent: not sent again every sweep


def test_a_waiting_run_is_listed_as_waiting(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def sleeper(ctx: Any) -> None:
        ctx.sleep("1h")

    run_id = h.enqueue("sleeper")
    assert h.run(run_id) == "waiting"
    view = h.get(run_id)
    assert (view.status, view.wait_reason) == ("waiting", "sleep")
    assert view.to_dict()["wait_reason"] == "sleep"


def test_the_relay_knows_when_the_next_sleeper_falls_due(h: Harness) -> None:
    from domain.runs.dispatch import next_due

    @h.registry.task(max_attempts=1)
    def sleeper(ctx: Any, seconds: float) -> None:
        ctx.sleep(seconds)

    short, long_ = (
        h.enqueue("sleeper", params={"seconds": 30}),
        h.enqueue("sleeper", params={"seconds": 3600}),
    )
    now = utc_now()
    assert next_due(h.engine, now=now, within_s=60) is None  # pending and due: nothing ahead
    assert h.run(short) == "waiting" and h.run(long_) == "waiting"
    due = next_due(h.engine, now=utc_now(), within_s=60)
    assert due is not None and due == h.get(short).not_before
    assert next_due(h.engine, now=utc_now(), within_s=10) is None  # none within 10 s
