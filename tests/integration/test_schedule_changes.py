"""Schedule edits are announced to the leading scheduler on PostgreSQL (LISTEN/NOTIFY) when
they commit, and only then; the scheduler then picks them up without waiting for its poll."""

from __future__ import annotations

import queue
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from domain.clock import utc_now
from domain.db.engine import create_db_engine
from domain.db.unit_of_work import UnitOfWork
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.settings import Settings
from scheduler import service as service_module
from scheduler.changes import ChangeListener
from scheduler.service import SchedulerService
from scheduler.triggers import Slots, TriggerSpec
from tests.fakes import FakePublisher
from tests.polling import eventually

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def add(
    engine: Engine,
    name: str,
    expression: str = "* * * * *",
    *,
    source: str = "cli",
    now: datetime = T0,
) -> None:
    spec = sched.ScheduleInput.parse(
        name=name, target="t", trigger="cron", expression=expression, source=source
    )
    slots = Slots(TriggerSpec(spec.trigger, spec.expression))
    manage.add_schedule(UnitOfWork(engine), spec, slots, now=now, replace=True)


class Heard:
    """Counts the listener's calls; `next()` waits for one."""

    def __init__(self) -> None:
        self.calls: queue.Queue[None] = queue.Queue()

    def __call__(self) -> None:
        self.calls.put(None)

    def next(self) -> None:
        self.calls.get(timeout=10)

    def pending(self) -> int:
        return self.calls.qsize()


@pytest.fixture
def heard(pg_engine: Engine) -> Heard:
    heard = Heard()
    listener = ChangeListener(pg_engine, heard)
    listener.start()
    heard.next()  # the call made once LISTEN is in place
    yield heard  # type: ignore[misc]
    listener.stop()


def _committed_marker(engine: Engine) -> None:
    """An announcement known to be sent: everything sent before it arrives before it."""
    with engine.begin() as conn:
        sched.announce_change(conn)


def test_every_kind_of_edit_is_announced_at_commit(pg_engine: Engine, heard: Heard) -> None:
    add(pg_engine, "a")
    heard.next()
    add(pg_engine, "a", "*/5 * * * *")  # edited
    heard.next()
    manage.set_enabled(UnitOfWork(pg_engine), "a", False, now=T0 + timedelta(minutes=1))
    heard.next()
    manage.set_enabled(UnitOfWork(pg_engine), "a", True, now=T0 + timedelta(minutes=2))
    heard.next()
    add(pg_engine, "b", source="code")
    heard.next()
    assert sched.disable_missing(pg_engine, "code", set(), now=T0) == ["b"]
    heard.next()
    manage.remove_schedule(UnitOfWork(pg_engine), "a")
    heard.next()
    _committed_marker(pg_engine)
    heard.next()
    assert heard.pending() == 0


def test_nothing_is_announced_without_a_change(pg_engine: Engine, heard: Heard) -> None:
    add(pg_engine, "a")
    heard.next()
    add(pg_engine, "a")  # re-declared unchanged: nothing written
    with pytest.raises(RuntimeError), pg_engine.begin() as conn:
        sched.announce_change(conn)
        raise RuntimeError("rolled back")
    assert sched.disable_missing(pg_engine, "code", set(), now=T0) == []
    _committed_marker(pg_engine)
    heard.next()
    assert heard.pending() == 0  # only the marker arrived


def test_the_listener_comes_back_after_its_connection_is_killed(
    pg_engine: Engine, heard: Heard
) -> None:
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN %%' "
            "AND pid <> pg_backend_pid()"
        )
    heard.next()  # reconnected: one call for whatever was missed meanwhile
    add(pg_engine, "a")
    heard.next()


def test_a_leading_scheduler_plans_an_added_schedule_from_the_notification(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the poll pushed out of reach, only the notification can make the leader see it."""
    monkeypatch.setattr(service_module, "POLL_WHILE_LISTENING_S", 3600.0)
    engine = create_db_engine(pg_url)
    settings = Settings(database_url=pg_url, home=tmp_path, pipelines_dir=tmp_path / "none")
    service = SchedulerService(settings, engine, FakePublisher())
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: service.listener is not None and service.listener.listening.is_set())
        # the sync made when LISTEN was in place may see "first"; nothing but a notification
        # can make a later one, so "late" reaches the plan only through its notification
        add(engine, "first", now=utc_now())
        first = manage.get_schedule(UnitOfWork(engine), "first")
        eventually(lambda: first.id in service.schedules.planned(), timeout=10)
        add(engine, "late", now=utc_now())
        late = manage.get_schedule(UnitOfWork(engine), "late")
        eventually(lambda: late.id in service.schedules.planned(), timeout=10)
        manage.set_enabled(UnitOfWork(engine), "late", False, now=utc_now())
        eventually(lambda: late.id not in service.schedules.planned(), timeout=10)
    finally:
        service.stop()
        thread.join(timeout=30)
        engine.dispose()
    assert not thread.is_alive()
