"""Rollups and retention (issue 6): incremental, idempotent, bounded, archived first."""

from __future__ import annotations

import gzip
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select, text

from domain.clock import utc_now
from domain.db import partitions
from domain.db.models import run_logs, runs
from domain.db.unit_of_work import UnitOfWork
from domain.housekeeping.retention import apply_retention, make_coming_days
from domain.housekeeping.rollups import Rolled, roll_up, stats_for
from domain.housekeeping.stats import run_stats, run_stats_for
from domain.runs import enqueue
from domain.runs import store as runstore
from domain.runs.requests import build_request
from domain.schedules.leader import last_beat
from domain.settings import Settings
from scheduler import service as service_module
from scheduler.service import SchedulerService
from tests.fakes import FakeClock, FakePublisher
from tests.polling import eventually
from worker.batches import run_metrics

T0 = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)


def finished(
    engine: Engine,
    clock: FakeClock,
    name: str,
    status: str,
    seconds: float,
    project: str = "default",
    usd: str = "0",
) -> uuid.UUID:
    run_id = enqueue.enqueue(
        UnitOfWork(engine, clock=clock), build_request(name=name, project=project)
    ).run.id
    with engine.begin() as conn:
        runstore.claim(conn, run_id, owner="w", now=clock(), lease_s=30)
        conn.execute(runs.update().where(runs.c.id == run_id).values(cost_usd=usd, tokens_in=10))
        conn.execute(
            insert(run_logs).values(
                run_id=run_id,
                seq=1,
                attempt=1,
                ts=clock(),
                stream="log",
                level="info",
                message=f"{name} log",
            )
        )
        runstore.finish(conn, run_id, 1, status=status, now=clock() + timedelta(seconds=seconds))
    return run_id


def test_rollups_per_hour_and_day_are_idempotent(engine: Engine, clock: FakeClock) -> None:
    clock.now = T0
    for i, (status, secs) in enumerate([("succeeded", 1), ("succeeded", 3), ("failed", 10)]):
        clock.now = T0 + timedelta(minutes=i)
        finished(engine, clock, "report", status, secs, usd="0.25")
    clock.now = T0 + timedelta(hours=1, minutes=5)
    finished(engine, clock, "report", "succeeded", 2, usd="0.25")
    assert roll_up(engine, now=T0 + timedelta(hours=2)).buckets == 3  # two hours, one day
    hours = stats_for(engine, period="hour", name="report")
    assert [h["period_start"] for h in hours] == [T0, T0 + timedelta(hours=1)]
    first = hours[0]
    assert first["counts"]["succeeded"] == 2 and first["counts"]["failed"] == 1
    assert (first["duration_max_s"], first["duration_p50_s"]) == (10, 3)
    assert first["cost_usd"] == __import__("decimal").Decimal("0.75")
    [day] = stats_for(engine, period="day")
    assert sum(day["counts"].values()) == 4 and day["tokens_in"] == 40
    roll_up(engine, now=T0 + timedelta(hours=3))  # again: the same numbers
    assert stats_for(engine, period="hour", name="report") == [
        {**h, "updated_at": stats_for(engine, period="hour", name="report")[i]["updated_at"]}
        for i, h in enumerate(hours)
    ]


def _rows(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(run_stats).order_by(run_stats.c.period, run_stats.c.period_start)
        )
        return [tuple(r)[1:-1] for r in rows]  # without the id and updated_at


def test_a_first_pass_over_a_history_goes_a_day_at_a_time_and_the_stats_read_on(
    engine: Engine, clock: FakeClock
) -> None:
    for day, secs in ((0, (1, 3)), (1, (2,)), (2, (4, 8, 9))):
        for i, s in enumerate(secs):
            clock.now = T0 + timedelta(days=day, minutes=i * 70)  # an hour apart and more
            finished(engine, clock, "report", "failed" if s == 9 else "succeeded", s, usd="0.5")
    clock.now = now = T0 + timedelta(days=2, hours=5)
    days = (T0.replace(hour=0), T0.replace(hour=0) + timedelta(days=3))

    def day_stats() -> list[tuple[Any, ...]]:
        got = run_stats_for(UnitOfWork(engine, clock=clock), since=days[0], until=days[1])
        return [(b.period_start.day, sum(b.counts.values()), b.duration_max_s) for b in got.items]

    expected = [(4, 2, 3.0), (5, 1, 2.0), (6, 3, 9.0)]
    assert run_stats_for(UnitOfWork(engine, clock=clock), since=days[0]).source == "runs"
    passes: list[Rolled] = []
    while not passes or not passes[-1].caught_up:  # a deadline already past: a day a pass
        passes.append(roll_up(engine, now=now, until=0.0))
        assert day_stats() == expected  # rolled up or not yet, the same numbers
        mid = run_stats_for(UnitOfWork(engine, clock=clock), since=days[0], until=days[1])
        assert mid.source == ("rollups" if passes[-1].caught_up else "mixed")
    assert [p.buckets for p in passes] == [2 + 1, 1 + 1, 3 + 1]  # each day's hours and itself
    rolled = _rows(engine)
    assert len(rolled) == 9
    with engine.begin() as conn:  # the same history in one pass: the same rows
        conn.execute(run_stats.delete())
        conn.execute(text("DELETE FROM sweep_cursors WHERE name = 'rollups'"))
    assert roll_up(engine, now=now).caught_up
    assert _rows(engine) == rolled


def test_a_pass_reads_back_only_as_far_as_a_run_may_commit_late(
    engine: Engine, clock: FakeClock
) -> None:
    clock.now = T0
    finished(engine, clock, "report", "succeeded", 1)
    clock.now = T0 + timedelta(hours=3)
    assert roll_up(engine, now=clock.now).buckets == 2  # hour 10 and its day
    late = T0 + timedelta(hours=3, minutes=-2)  # ended before that pass, committed after it
    clock.now = late
    finished(engine, clock, "report", "failed", 60)
    clock.now = T0 + timedelta(hours=3, minutes=1)
    again = roll_up(engine, now=clock.now)
    assert again.buckets == 2  # the one hour the late run ended in, and its day
    [day] = stats_for(engine, period="day")
    assert (day["counts"]["succeeded"], day["counts"]["failed"]) == (1, 1)
    hours = stats_for(engine, period="hour")
    assert [(h["period_start"], sum(h["counts"].values())) for h in hours] == [
        (T0, 1),
        (T0 + timedelta(hours=2), 1),  # it started at 12:58 and ended at 12:59
    ]


def test_the_scheduler_rolls_a_backlog_up_in_slices_without_waiting_its_interval(
    db_url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a slice too short for more than a day, the leader's loop comes straight back for
    the next day (the rollup interval, 60 s, is for a caught-up pass), beating meanwhile."""
    clock = FakeClock()
    for back in (4, 3, 2, 1):
        clock.now = utc_now() - timedelta(days=back)
        finished(engine, clock, "report", "succeeded", 1)
    monkeypatch.setattr(service_module, "HOUSEKEEPING_SLICE_S", 0.0)
    passes: list[Rolled] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(roll_up(*args, **kwargs))
        return passes[-1]

    monkeypatch.setattr(service_module, "roll_up", counted)
    settings = Settings(database_url=db_url, home=tmp_path, pipelines_dir=tmp_path / "none")
    assert settings.rollup_interval_s == 60
    service = SchedulerService(settings, engine, FakePublisher())
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: len(stats_for(engine, period="day")) == 4, timeout=30)
        eventually(lambda: passes and passes[-1].caught_up, timeout=30)
    finally:
        service.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(passes) >= 5 and not any(p.caught_up for p in passes[:4])  # a day a pass
    assert last_beat(engine) is not None


def test_retention_deletes_in_batches_with_rules_and_archives(
    engine: Engine, clock: FakeClock, tmp_path: Path
) -> None:
    clock.now = T0
    old = [finished(engine, clock, "job", "succeeded", 1) for _ in range(7)]
    old_failed = finished(engine, clock, "job", "failed", 1)
    clock.now = T0 + timedelta(days=40)
    recent = finished(engine, clock, "job", "succeeded", 1)
    pending = enqueue.enqueue(UnitOfWork(engine, clock=clock), build_request(name="job")).run.id
    deleted = apply_retention(
        engine,
        now=clock.now,
        default_days=30,
        rules={"*:failed": 90},
        archive_dir=tmp_path,
        batch=3,
    )
    assert deleted == 7  # the failed one is kept for 90 days
    with engine.connect() as conn:
        left = set(conn.execute(select(runs.c.id)).scalars())
        lines = conn.execute(select(func.count()).select_from(run_logs)).scalar_one()
    assert left == {old_failed, recent, pending}
    assert lines == 2  # the deleted runs' logs went with them
    [archive] = list(tmp_path.glob("runs-*.jsonl.gz"))
    with gzip.open(archive, "rt") as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["id"] for r in records) == sorted(str(r) for r in old)
    assert records[0]["logs"][0]["message"] == "job log"


def _uuid7_at(when: datetime) -> uuid.UUID:
    ms = int(when.timestamp() * 1000)
    return uuid.UUID(int=ms << 80 | 0x7 << 76 | 0b10 << 62 | uuid.uuid4().int & ((1 << 62) - 1))


def _old_run(
    engine: Engine, created: datetime, status: str, finished: datetime | None
) -> uuid.UUID:
    """A run made at `created` (its id too, as uuid7 made it then), with a line and a metric."""
    run_id = _uuid7_at(created)
    with engine.begin() as conn:
        conn.execute(
            insert(runs).values(
                id=run_id,
                name="old",
                status=status,
                attempt=1,
                created_at=created,
                started_at=created,
                finished_at=finished,
            )
        )
        conn.execute(
            insert(run_logs).values(
                run_id=run_id, seq=1, attempt=1, ts=created, message=f"{status} line"
            )
        )
        conn.execute(insert(run_metrics).values(run_id=run_id, ts=created, name="m", value=1))
    return run_id


def _partition_of(engine: Engine, table: str, day: datetime) -> str | None:
    with engine.connect() as conn:
        name = f"{table}_p{day:%Y%m%d}"
        return conn.execute(select(func.to_regclass(name))).scalar()


@pytest.mark.postgres
def test_retention_drops_a_day_whose_runs_all_may_go_and_keeps_a_day_with_a_run_to_keep(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """Day 1's runs all finished past their cutoff: they go with day 1's partitions (archived
    first). Day 2 has a run still running: its partitions and its lines stay; its finished run
    waits for the day, then goes row by row once the day cannot go whole."""
    day1, day2 = datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 3, 2, tzinfo=UTC)
    with pg_engine.begin() as conn:
        for day in (day1, day2):
            partitions.ensure(conn, today=day.date(), ahead_days=0)
    gone = [
        _old_run(pg_engine, day1 + timedelta(hours=h), s, day1 + timedelta(hours=h + 1))
        for h, s in [(1, "succeeded"), (5, "failed"), (9, "cancelled")]
    ]
    finished_day2 = _old_run(
        pg_engine, day2 + timedelta(hours=1), "succeeded", day2 + timedelta(hours=2)
    )
    running = _old_run(pg_engine, day2 + timedelta(hours=3), "running", None)
    child = enqueue.enqueue(UnitOfWork(pg_engine), build_request(name="child")).run.id
    with pg_engine.begin() as conn:
        conn.execute(runs.update().where(runs.c.id == child).values(parent_run_id=gone[0]))

    now = day2 + timedelta(days=31, hours=12)  # cutoff: day 2, 12:00
    assert apply_retention(pg_engine, now=now, default_days=30, archive_dir=tmp_path) == 3
    assert _partition_of(pg_engine, "run_logs", day1) is None
    assert _partition_of(pg_engine, "run_metrics", day1) is None
    assert _partition_of(pg_engine, "run_logs", day2) == f"run_logs_p{day2:%Y%m%d}"
    with pg_engine.connect() as conn:
        left = set(conn.execute(select(runs.c.id)).scalars())
        lines = dict(conn.execute(select(run_logs.c.run_id, run_logs.c.message)).all())
        parent = conn.execute(select(runs.c.parent_run_id).where(runs.c.id == child)).scalar()
    assert left == {finished_day2, running, child}
    assert lines == {finished_day2: "succeeded line", running: "running line"}
    assert parent is None
    [archive] = list(tmp_path.glob("runs-*.jsonl.gz"))
    with gzip.open(archive, "rt") as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["id"] for r in records) == sorted(str(r) for r in gone)
    assert {r["logs"][0]["message"] for r in records} == {
        "succeeded line",
        "failed line",
        "cancelled line",
    }

    # A day later day 2 still cannot go whole (a run is running): its finished run goes alone.
    assert apply_retention(pg_engine, now=now + timedelta(days=1), default_days=30) == 1
    with pg_engine.connect() as conn:
        left = set(conn.execute(select(runs.c.id)).scalars())
        lines = dict(conn.execute(select(run_logs.c.run_id, run_logs.c.message)).all())
        metrics = set(conn.execute(select(run_metrics.c.run_id)).scalars())
    assert left == {running, child}
    assert lines == {running: "running line"}
    assert metrics == {running}
    assert _partition_of(pg_engine, "run_logs", day2) == f"run_logs_p{day2:%Y%m%d}"


@pytest.mark.postgres
def test_making_partitions_moves_rows_waiting_in_default_into_their_day(
    pg_engine: Engine,
) -> None:
    """Lines of a day nobody made a partition for land in DEFAULT; making the coming days'
    partitions makes that day's too and moves them into it, and makes a week ahead."""
    lost = datetime(2024, 7, 9, 12, tzinfo=UTC)
    with pg_engine.begin() as conn:
        for table in partitions.TABLES:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}_p{lost:%Y%m%d}"))
    run_id = _old_run(pg_engine, lost, "running", None)
    with pg_engine.connect() as conn:
        home = "SELECT DISTINCT tableoid::regclass::text FROM {} WHERE run_id = :id"
        assert conn.execute(text(home.format("run_logs")), {"id": run_id}).scalar() == (
            "run_logs_default"
        )
    now = datetime.now(UTC)
    assert make_coming_days(pg_engine, now=now) >= 2
    with pg_engine.connect() as conn:
        assert conn.execute(text(home.format("run_logs")), {"id": run_id}).scalar() == (
            f"run_logs_p{lost:%Y%m%d}"
        )
        assert conn.execute(text(home.format("run_metrics")), {"id": run_id}).scalar() == (
            f"run_metrics_p{lost:%Y%m%d}"
        )
    week = now + timedelta(days=partitions.AHEAD_DAYS)
    assert _partition_of(pg_engine, "run_logs", week) == f"run_logs_p{week:%Y%m%d}"
    assert make_coming_days(pg_engine, now=now) == 0  # all there already


@pytest.mark.postgres
def test_a_run_made_in_a_day_while_it_is_deleted_keeps_the_day(pg_engine: Engine) -> None:
    """Retention checked that every run of the day may go; a run with an id of that day is made
    before the delete commits: nothing of the day goes, the new run's line included."""
    day = datetime(2025, 4, 1, tzinfo=UTC)
    with pg_engine.begin() as conn:
        partitions.ensure(conn, today=day.date(), ahead_days=0)
    old = _old_run(pg_engine, day + timedelta(hours=1), "succeeded", day + timedelta(hours=2))
    bounds = {partitions.day_floor(day.date()), partitions.day_floor(day.date() + timedelta(1))}
    late: list[uuid.UUID] = []

    @event.listens_for(pg_engine, "before_cursor_execute")
    def make_late_run(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        deleting = statement.lstrip().upper().startswith("DELETE FROM RUNS")
        if deleting and bounds <= set(params.values()) and not late:  # this day's delete
            late.append(_old_run(pg_engine, day + timedelta(hours=3), "running", None))

    now = day + timedelta(days=31, hours=12)
    assert apply_retention(pg_engine, now=now, default_days=30) == 0
    assert late
    with pg_engine.connect() as conn:
        left = set(conn.execute(select(runs.c.id)).scalars())
        lined = set(conn.execute(select(run_logs.c.run_id)).scalars())
    assert left == lined == {old, late[0]}
    assert _partition_of(pg_engine, "run_logs", day) == f"run_logs_p{day:%Y%m%d}"
