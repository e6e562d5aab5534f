"""A schedule never stops firing (guarantee 5, "no gap"), with the runner's real APScheduler:
a schedule planned onto an instant that is being fired still fires it, and a plan or a cursor
that falls behind the clock is caught by the watchdog and re-planned under the misfire policy."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from domain.clock import utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.ports import Dispatch
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.settings import Settings
from scheduler import service as service_module
from scheduler.schedule_runner import ScheduleRunner
from scheduler.service import SchedulerService
from scheduler.triggers import Slots, TriggerSpec
from tests.fakes import FakePublisher
from tests.polling import eventually
from tests.schedule_slots import assert_every_slot_once, fires_and_runs

EVERY_SECOND = Slots(TriggerSpec("interval", "1s"))


class HoldingPublisher(FakePublisher):
    """Builds messages ahead like the real publisher; the first `prepare` (called while an
    instant's transaction is staged, before its slot) waits there until the test lets it go,
    so the test acts while that instant is certainly being fired."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.release = threading.Event()

    def prepare(self, dispatches: Sequence[Dispatch]) -> Callable[[], None]:
        if not self.holding.is_set():
            self.holding.set()
            self.release.wait(timeout=10)
        return lambda: self.publish(dispatches)


def every_second(engine: Engine, name: str, **fields: Any) -> sched.ScheduleView:
    spec = sched.ScheduleInput.parse(
        name=name, target="t", trigger="interval", expression="1s", **fields
    )
    return manage.add_schedule(UnitOfWork(engine), spec, EVERY_SECOND, now=utc_now())


def fires_of(engine: Engine, schedule_id: int) -> list[tuple[datetime, str, Any]]:
    return fires_and_runs(engine, schedule_id)[0]


@pytest.mark.postgres  # instants are staged ahead of their slot on PostgreSQL only
def test_a_schedule_planned_onto_the_instant_being_fired_fires_it(pg_engine: Engine) -> None:
    """Schedules added while the instant they first fire at is already staged (the half
    second before it) fire that instant right after it, and every slot after."""
    tick = every_second(pg_engine, "tick")
    publisher = HoldingPublisher()
    runner = ScheduleRunner(pg_engine, publisher, misfire_grace_s=60)
    runner.start()
    try:
        assert publisher.holding.wait(timeout=15)
        # The instant is staged and its job is in flight: add schedules due at it, and sync
        # as the leader does when their NOTIFY arrives.
        late = [every_second(pg_engine, f"late-{k}") for k in range(3)]
        runner.sync(force=True)
        publisher.release.set()
        eventually(lambda: all(len(fires_of(pg_engine, v.id)) >= 3 for v in late), timeout=20)
    finally:
        publisher.release.set()
        runner.stop()
    for view in [tick, *late]:
        assert set(assert_every_slot_once(pg_engine, view)) == {"enqueued"}


@contextmanager
def leading(
    db_url: str, engine: Engine, home: Path, publisher: FakePublisher, *, grace_s: float = 1
) -> Iterator[SchedulerService]:
    """The scheduler service in a thread, leading on `engine`."""
    settings = Settings(
        database_url=db_url,
        home=home,
        pipelines_dir=home / "none",
        schedule_misfire_grace_s=grace_s,
    )
    service = SchedulerService(settings, engine, publisher)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: service.schedules.aps is not None, timeout=15)
        yield service
    finally:
        service.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.fixture
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog every second; edits heard only by notification (no 30 s poll), so any
    repair comes from the watchdog."""
    monkeypatch.setattr(service_module, "WATCH_EVERY_S", 1.0)
    monkeypatch.setattr(service_module, "POLL_WHILE_LISTENING_S", 3600.0)


@pytest.mark.usefixtures("quick_watch")
def test_the_watchdog_repairs_a_plan_whose_instant_has_no_job(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """The plan waits for an instant no job will fire (the jobs are removed while an instant
    is in flight): the watchdog logs the schedule overdue and re-plans it; the slots it
    missed are recorded by the misfire policy (skip), and it fires on time again after."""
    tick = every_second(engine, "tick")
    publisher = HoldingPublisher()
    with capture_logs() as events, leading(db_url, engine, tmp_path, publisher) as service:
        assert publisher.holding.wait(timeout=15)
        aps = service.schedules.aps
        assert aps is not None
        aps.remove_all_jobs()  # the next instant's job, added before this one fired
        publisher.release.set()
        eventually(lambda: _overdue(events, "tick"), timeout=20)
        behind = len(fires_of(engine, tick.id))
        eventually(lambda: _on_time(engine, tick.id, behind + 3), timeout=20)
        manage.set_enabled(UnitOfWork(engine), "tick", False, now=utc_now())
    (first, *_) = _overdue(events, "tick")
    assert first["seen_in"] == "plan" and first["late_s"] > 0
    outcomes = assert_every_slot_once(engine, tick)
    assert "skipped_misfire" in outcomes  # missed by more than the 1 s grace
    assert set(outcomes) == {"enqueued", "skipped_misfire"}


@pytest.mark.usefixtures("quick_watch")
def test_the_watchdog_repairs_a_schedule_the_plan_lost(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """A schedule dropped from the plan (nothing waits for its next instant) falls behind in
    the database: the watchdog sees its next fire in the past, once, and re-plans it."""
    tick = every_second(engine, "tick")
    with capture_logs() as events, leading(db_url, engine, tmp_path, FakePublisher()) as service:
        eventually(lambda: len(fires_of(engine, tick.id)) >= 2, timeout=15)
        runner = service.schedules
        with runner._lock:
            runner._unplan_slot(tick.id)  # the plan forgets its next instant
        eventually(lambda: _overdue(events, "tick"), timeout=20)
        behind = len(fires_of(engine, tick.id))
        eventually(lambda: _on_time(engine, tick.id, behind + 3), timeout=20)
        manage.set_enabled(UnitOfWork(engine), "tick", False, now=utc_now())
    reports = _overdue(events, "tick")
    assert [r["seen_in"] for r in reports] == ["cursor"]
    outcomes = assert_every_slot_once(engine, tick)
    assert set(outcomes) == {"enqueued", "skipped_misfire"}


def test_with_no_misfire_grace_a_slot_fired_on_time_still_runs(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """Grace 0 makes every slot not fired on time a misfire, but a job that runs a moment
    after its instant (APScheduler's wake-up; on SQLite nothing is staged ahead) is on time."""
    tick = every_second(engine, "tick")
    with leading(db_url, engine, tmp_path, FakePublisher(), grace_s=0):
        eventually(lambda: len(fires_of(engine, tick.id)) >= 4, timeout=20)
        manage.set_enabled(UnitOfWork(engine), "tick", False, now=utc_now())
    outcomes = assert_every_slot_once(engine, tick)
    assert outcomes[-3:] == ["enqueued"] * 3  # the first may have passed while it started


def _overdue(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "schedule.overdue" and e.get("schedule") == name]


def _on_time(engine: Engine, schedule_id: int, at_least: int) -> bool:
    """`at_least` slots recorded, the last three of them enqueued."""
    fires = fires_of(engine, schedule_id)
    return len(fires) >= at_least and [f[1] for f in fires[-3:]] == ["enqueued"] * 3
