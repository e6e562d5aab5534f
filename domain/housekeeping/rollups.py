"""Housekeeping the scheduler leader does: hourly/daily rollups into run_stats (retention is
domain/housekeeping/retention.py).

A pass rewrites, whole, each hour and day bucket that runs finished in since the last pass
(from the rollup cursor, less `ROLLUP_OVERLAP` when it was moved that recently), a day at a
time: each day's hours and the day in one transaction that also moves the cursor past it.
The buckets are computed as the stats API computes them from runs (`buckets_from_runs`: by
PostgreSQL itself, or in Python on SQLite), so both give the same numbers. The first pass
over a long history (a year of it, on first start) goes a slice at a time when given a
deadline: the cursor says how far it got, the stats API answers the days it has not reached
from runs, and the next pass goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import Connection, Engine, Table, func, select

from domain.db import cursors, sql
from domain.db.models import runs
from domain.db.models_platform import RunStat
from domain.housekeeping.stats import PERIODS, ROLLUPS, Bucket, buckets_from_runs, floor
from domain.runs.states import ALL_STATUSES, TERMINAL

log = structlog.get_logger("conveyor.maintenance")

stats = cast(Table, RunStat.__table__)
#: Rollups look back this far behind the cursor, so runs finishing out of order are counted.
ROLLUP_OVERLAP = timedelta(minutes=5)
_DAY = PERIODS["day"]


@dataclass(frozen=True, slots=True)
class Rolled:
    buckets: int  # hour and day buckets written
    caught_up: bool  # False: the deadline came first; the next pass goes on from the cursor


def roll_up(engine: Engine, *, now: datetime, until: float | None = None) -> Rolled:
    """Rewrite the hour and day buckets touched by runs finished since the last pass, a day
    at a time, up to `now`; with `until` (a `time.perf_counter()` deadline) stop after the day
    that passes it. Each bucket is recomputed whole from `runs`, so running it twice changes
    nothing."""
    with engine.connect() as conn:
        cursor = cursors.read_at(conn, ROLLUPS)
        if cursor is None:  # the first pass: from the first run that ever finished
            position = conn.execute(select(func.min(runs.c.finished_at))).scalar() or now
        else:  # a run may commit after the pass that read past its end: look back for it
            reached, written_at = cursor
            position = min(reached, written_at - ROLLUP_OVERLAP)
    written, start = 0, min(position, now)
    day, first_hour = floor(start, "day"), floor(start, "hour")
    while True:
        reached = min(day + _DAY, now)
        with engine.begin() as conn:
            written += _rewrite(conn, "hour", first_hour, day + _DAY, now)
            written += _rewrite(conn, "day", day, day + _DAY, now)
            cursors.move(conn, ROLLUPS, reached, now)
        if reached >= now:
            return Rolled(written, True)
        if until is not None and time.perf_counter() >= until:
            log.info("rollups.slice", reached=reached.isoformat(), buckets=written)
            return Rolled(written, False)
        day = first_hour = day + _DAY


def _rewrite(conn: Connection, period: str, start: datetime, end: datetime, now: datetime) -> int:
    """Recompute the `period` buckets of [start, end) (`start` on a bucket's start) from runs."""
    buckets = buckets_from_runs(conn, period, start, end, max_rows=None)
    if buckets:
        upsert = sql.insert(conn, stats)
        conn.execute(
            upsert.on_conflict_do_update(
                index_elements=["period", "period_start", "project", "name"],
                set_={c: upsert.excluded[c] for c in _VALUES},
            ),
            [_row(period, b, now) for b in buckets],
        )
    return len(buckets)


_VALUES = (
    "counts",
    "duration_p50_s",
    "duration_p95_s",
    "duration_max_s",
    "cost_usd",
    "tokens_in",
    "tokens_out",
    "updated_at",
)


def _row(period: str, bucket: Bucket, now: datetime) -> dict[str, Any]:
    counts = {s: 0 for s in ALL_STATUSES if s in TERMINAL}
    return {
        "period": period,
        "period_start": bucket.period_start,
        "project": bucket.project,
        "name": bucket.name,
        "counts": counts | {s: int(n) for s, n in bucket.counts.items()},
        "duration_p50_s": bucket.duration_p50_s,
        "duration_p95_s": bucket.duration_p95_s,
        "duration_max_s": bucket.duration_max_s,
        "cost_usd": bucket.cost_usd,
        "tokens_in": int(bucket.tokens_in or 0),
        "tokens_out": int(bucket.tokens_out or 0),
        "updated_at": now,
    }


def stats_for(
    engine: Engine,
    *,
    period: str = "day",
    project: str | None = None,
    name: str | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    query = select(stats).where(stats.c.period == period).order_by(stats.c.period_start)
    if project:
        query = query.where(stats.c.project == project)
    if name:
        query = query.where(stats.c.name == name)
    if since:
        query = query.where(stats.c.period_start >= since)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
