"""Rollups and retention (issue 6): incremental, idempotent, bounded, archived first."""

from __future__ import annotations

import gzip
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, func, insert, select

from domain.db.models import run_logs, runs
from domain.db.unit_of_work import UnitOfWork
from domain.housekeeping.rollups import apply_retention, roll_up, stats_for
from domain.runs import enqueue
from domain.runs import store as runstore
from domain.runs.requests import build_request
from tests.fakes import FakeClock

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
    assert roll_up(engine, now=T0 + timedelta(hours=2)) == 3  # two hours, one day
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
