"""Housekeeping the scheduler leader does: hourly/daily rollups into run_stats (retention is
domain/housekeeping/retention.py)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import structlog
from sqlalchemy import Connection, Engine, Table, select

from domain.db import sql
from domain.db.models import runs
from domain.db.models_platform import RunStat, SweepCursor
from domain.runs.states import ALL_STATUSES, TERMINAL

log = structlog.get_logger("conveyor.maintenance")

stats = cast(Table, RunStat.__table__)
cursors = cast(Table, SweepCursor.__table__)
#: Rollups look back this far behind the cursor, so runs finishing out of order are counted.
ROLLUP_OVERLAP = timedelta(minutes=5)


def read_cursor(conn: Connection, name: str) -> datetime | None:
    """Where the sweep `name` stopped last time (a `sweep_cursors` row), if it ever ran."""
    return conn.execute(select(cursors.c.position).where(cursors.c.name == name)).scalar()


def set_cursor(conn: Connection, name: str, position: datetime, now: datetime) -> None:
    """Record where the sweep `name` stopped."""
    conn.execute(
        sql.insert(conn, cursors)
        .values(name=name, position=position, updated_at=now)
        .on_conflict_do_update(
            index_elements=["name"], set_={"position": position, "updated_at": now}
        )
    )


def _bucket(when: datetime, period: str) -> datetime:
    when = when.astimezone(UTC)
    if period == "hour":
        return when.replace(minute=0, second=0, microsecond=0)
    return when.replace(hour=0, minute=0, second=0, microsecond=0)


def roll_up(engine: Engine, *, now: datetime) -> int:
    """Recompute the hour and day buckets touched by runs finished since the last pass.
    Each bucket is recomputed whole from `runs`, so running it twice changes nothing."""
    with engine.begin() as conn:
        since = read_cursor(conn, "rollups")
        query = select(runs.c.finished_at).where(runs.c.finished_at.is_not(None))
        if since is not None:
            query = query.where(runs.c.finished_at >= since - ROLLUP_OVERLAP)
        touched = {(p, _bucket(t, p)) for (t,) in conn.execute(query) for p in ("hour", "day")}
        for period, start in sorted(touched):
            _recompute(conn, period, start, now)
        set_cursor(conn, "rollups", now, now)
    return len(touched)


def _recompute(conn: Connection, period: str, start: datetime, now: datetime) -> None:
    end = start + (timedelta(hours=1) if period == "hour" else timedelta(days=1))
    rows = conn.execute(
        select(
            runs.c.project,
            runs.c.name,
            runs.c.status,
            runs.c.started_at,
            runs.c.finished_at,
            runs.c.cost_usd,
            runs.c.tokens_in,
            runs.c.tokens_out,
        ).where(runs.c.finished_at >= start, runs.c.finished_at < end)
    ).all()
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for row in rows:
        groups[(row.project, row.name)].append(row)
    for (project, name), members in groups.items():
        durations = sorted(
            (r.finished_at - r.started_at).total_seconds() for r in members if r.started_at
        )
        counts = {s: 0 for s in ALL_STATUSES if s in TERMINAL}
        for r in members:
            counts[r.status] = counts.get(r.status, 0) + 1
        values = {
            "counts": counts,
            "duration_p50_s": _pct(durations, 50),
            "duration_p95_s": _pct(durations, 95),
            "duration_max_s": durations[-1] if durations else None,
            "cost_usd": sum((Decimal(r.cost_usd) for r in members), Decimal(0)),
            "tokens_in": sum(r.tokens_in for r in members),
            "tokens_out": sum(r.tokens_out for r in members),
            "updated_at": now,
        }
        conn.execute(
            sql.insert(conn, stats)
            .values(period=period, period_start=start, project=project, name=name, **values)
            .on_conflict_do_update(
                index_elements=["period", "period_start", "project", "name"], set_=values
            )
        )


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


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
