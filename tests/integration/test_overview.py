"""The dashboard overview's reads on SQLite and PostgreSQL: backlog per queue, ended runs per
minute with failures, workers, and runs stuck behind an expired lease."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from domain.db.unit_of_work import UnitOfWork
from domain.runs.overview import read_overview
from tests.runs_seed import insert_run, insert_worker

NOW = datetime(2026, 11, 1, 12, 30, 20, tzinfo=UTC)


def test_backlog_per_queue_and_the_oldest_queued(engine: Engine) -> None:
    oldest = NOW - timedelta(minutes=42)
    insert_run(engine, queue="default", created_at=NOW - timedelta(minutes=5))
    insert_run(engine, queue="default", created_at=oldest, status="waiting")
    insert_run(engine, queue="default", created_at=NOW - timedelta(hours=3), status="running")
    insert_run(engine, queue="gpu", created_at=NOW - timedelta(minutes=1))
    insert_run(engine, queue="gpu", status="succeeded")  # ended: in no backlog
    insert_run(engine, queue="done-only", status="failed")

    view = read_overview(UnitOfWork(engine, read_only=True), now=NOW)

    by_queue = {q.queue: q for q in view.queues}
    assert set(by_queue) == {"default", "gpu"}
    default = by_queue["default"]
    assert (default.pending, default.running, default.waiting) == (1, 1, 1)
    # The running run is older, but it is not queued.
    assert default.oldest_queued_at == oldest
    assert default.oldest_age_s(NOW) == 42 * 60
    assert (by_queue["gpu"].pending, by_queue["gpu"].running) == (1, 0)


def test_runs_per_minute_count_each_ended_run_once_in_its_minute(engine: Engine) -> None:
    minute = NOW.replace(second=0)
    for status, ended in [
        ("succeeded", minute + timedelta(seconds=1)),
        ("failed", minute + timedelta(seconds=19)),
        ("succeeded", minute - timedelta(seconds=1)),  # the minute before
        ("timed_out", minute - timedelta(minutes=10)),
        ("cancelled", minute - timedelta(minutes=10, seconds=-59)),
        ("succeeded", minute - timedelta(minutes=60)),  # just outside the hour shown
    ]:
        insert_run(engine, status=status, created_at=ended, finished_at=ended)
    insert_run(engine, status="running", created_at=minute)

    view = read_overview(UnitOfWork(engine, read_only=True), now=NOW)

    assert len(view.minutes) == 60
    assert view.minutes[-1].start == minute
    assert view.minutes[0].start == minute - timedelta(minutes=59)
    counts = {m.start: (m.ended, m.failed) for m in view.minutes if m.ended}
    assert counts == {
        minute: (2, 1),
        minute - timedelta(minutes=1): (1, 0),
        minute - timedelta(minutes=10): (2, 1),  # timed_out fails; a cancel does not
    }


def test_workers_and_stuck_runs(engine: Engine) -> None:
    now = datetime.now(UTC)
    insert_worker(engine, "w-alive", silent_s=2)
    insert_worker(engine, "w-lost", silent_s=120)
    insert_worker(engine, "w-gone", silent_s=1, stopped=True)
    stuck = insert_run(
        engine, status="running", attempt=1, lease_expires_at=now - timedelta(seconds=30)
    )
    insert_run(engine, status="running", attempt=1, lease_expires_at=now + timedelta(seconds=30))

    view = read_overview(UnitOfWork(engine, read_only=True), now=now)

    assert {w.id: w.state for w in view.workers} == {"w-alive": "alive", "w-lost": "lost"}
    assert [run.id for run in view.stuck] == [stuck]
