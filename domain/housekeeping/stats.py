"""Run statistics per project, name and hour or day of the runs' end: from the `run_stats`
rollups as far as the scheduler has written them (domain/housekeeping/rollups.py), computed
from `runs` past that, the same way (finished runs, bucketed by finished_at). The rollups
compute their buckets with `buckets_from_runs` too."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import ColumnElement, Connection, Select, Table, extract, func, select

from domain.db import cursors
from domain.db.capabilities import capabilities
from domain.db.models import runs
from domain.db.models_platform import RunStat
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput
from domain.runs.states import ALL_STATUSES
from domain.runs.views import jsonable

run_stats = cast(Table, RunStat.__table__)
#: the sweep cursor of the rollups (domain/housekeeping/rollups.py): the buckets that began
#: before it are in `run_stats`
ROLLUPS = "rollups"

PERIODS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
#: the longest window per period (a month of hours, a year of days)
MAX_WINDOW = {"hour": timedelta(days=31), "day": timedelta(days=366)}
DEFAULT_WINDOW = {"hour": timedelta(hours=24), "day": timedelta(days=7)}
#: SQLite (dev mode) aggregates in Python; past this many runs in the window it refuses
MAX_SQLITE_ROWS = 200_000


@dataclass(frozen=True, slots=True)
class Bucket:
    period_start: datetime
    project: str
    name: str
    counts: dict[str, int]
    duration_p50_s: float | None
    duration_p95_s: float | None
    duration_max_s: float | None
    cost_usd: Decimal
    tokens_in: int
    tokens_out: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "period_start": jsonable(self.period_start),
            "project": self.project,
            "name": self.name,
            "counts": {s: int(self.counts.get(s, 0)) for s in ALL_STATUSES},
            "total": sum(int(n) for n in self.counts.values()),
            "duration_p50_s": self.duration_p50_s,
            "duration_p95_s": self.duration_p95_s,
            "duration_max_s": self.duration_max_s,
            "cost_usd": f"{Decimal(self.cost_usd or 0).normalize():f}",
            "tokens_in": int(self.tokens_in or 0),
            "tokens_out": int(self.tokens_out or 0),
        }


@dataclass(frozen=True, slots=True)
class Stats:
    period: str
    since: datetime
    until: datetime
    source: str  # rollups | runs | mixed (the rollups' buckets, then the newest from runs)
    items: list[Bucket]
    truncated: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "since": jsonable(self.since),
            "until": jsonable(self.until),
            "source": self.source,
            "items": [item.to_dict() for item in self.items],
            "truncated": self.truncated,
        }


def floor(instant: datetime, period: str) -> datetime:
    """The start of the hour or day (UTC) `instant` falls in."""
    value = instant.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return value.replace(hour=0) if period == "day" else value


def ceil(instant: datetime, period: str) -> datetime:
    """The start of the first hour or day (UTC) that begins at or after `instant`."""
    start = floor(instant, period)
    return start if start == instant else start + PERIODS[period]


def window(
    period: str, since: datetime | None, until: datetime | None, *, now: datetime
) -> tuple[datetime, datetime]:
    """[since, until) aligned to whole periods; defaults to the last 24 hours or 7 days."""
    if period not in PERIODS:
        raise InvalidInput(f"period: expected hour or day (got {period!r})", field="period")
    end = until or now
    start = since or end - DEFAULT_WINDOW[period]
    if start >= end:
        raise InvalidInput("since: must be before until", field="since")
    if end - start > MAX_WINDOW[period]:
        raise InvalidInput(
            f"since: a window of {period}s spans at most {MAX_WINDOW[period].days} days",
            field="since",
        )
    try:
        return floor(start, period), end
    except (OverflowError, ValueError):
        raise InvalidInput("since: out of range", field="since") from None


def run_stats_for(
    uow: UnitOfWork,
    *,
    period: str = "day",
    since: datetime | None = None,
    until: datetime | None = None,
    project: str | None = None,
    name: str | None = None,
    limit: int = 1000,
) -> Stats:
    """The buckets of [since, until): those the scheduler's rollups have reached (a bucket
    that began before the rollup cursor) from `run_stats`, the rest computed from `runs`."""
    start, end = window(period, since, until, now=uow.clock())
    with uow:
        rolled = cursors.read(uow.conn, ROLLUPS)
        boundary = min(max(ceil(rolled, period), start), end) if rolled is not None else start
        items = []
        if boundary > start:
            items += _from_rollups(uow, period, start, boundary, project, name, limit + 1)
        if boundary < end:
            items += buckets_from_runs(
                uow.conn, period, boundary, end, project=project, name=name, limit=limit + 1
            )
    source = "runs" if boundary <= start else "rollups" if boundary >= end else "mixed"
    items.sort(key=lambda b: (b.period_start, b.project, b.name))
    return Stats(period, start, end, source, items[:limit], len(items) > limit)


def buckets_from_runs(
    conn: Connection,
    period: str,
    start: datetime,
    end: datetime,
    *,
    project: str | None = None,
    name: str | None = None,
    limit: int | None = None,
    max_rows: int | None = MAX_SQLITE_ROWS,
) -> list[Bucket]:
    """The buckets of the runs that finished in [start, end), computed from `runs` (by the
    database on PostgreSQL; on SQLite in Python, refusing more than `max_rows` runs)."""
    if capabilities(conn).server_stats:
        return _from_runs_pg(conn, period, start, end, project, name, limit)
    return _from_runs_py(conn, period, start, end, project, name, max_rows)[:limit]


def _filtered(stmt: Select[Any], table: Table, project: str | None, name: str | None) -> Any:
    if project is not None:
        stmt = stmt.where(table.c.project == project)
    if name is not None:
        stmt = stmt.where(table.c.name == name)
    return stmt


def _from_rollups(
    uow: UnitOfWork,
    period: str,
    start: datetime,
    end: datetime,
    project: str | None,
    name: str | None,
    limit: int,
) -> list[Bucket]:
    stmt = _filtered(
        select(run_stats).where(
            run_stats.c.period == period,
            run_stats.c.period_start >= start,
            run_stats.c.period_start < end,
        ),
        run_stats,
        project,
        name,
    )
    stmt = stmt.order_by(run_stats.c.period_start, run_stats.c.project, run_stats.c.name)
    return [
        Bucket(
            period_start=row["period_start"],
            project=row["project"],
            name=row["name"],
            counts={str(k): int(v) for k, v in (row["counts"] or {}).items()},
            duration_p50_s=row["duration_p50_s"],
            duration_p95_s=row["duration_p95_s"],
            duration_max_s=row["duration_max_s"],
            cost_usd=row["cost_usd"],
            tokens_in=row["tokens_in"],
            tokens_out=row["tokens_out"],
        )
        for row in uow.conn.execute(stmt.limit(limit)).mappings()
    ]


def _from_runs_pg(
    conn: Connection,
    period: str,
    start: datetime,
    end: datetime,
    project: str | None,
    name: str | None,
    limit: int | None,
) -> list[Bucket]:
    bucket = func.date_trunc(period, runs.c.finished_at, "UTC").label("bucket")
    duration: ColumnElement[Any] = extract("epoch", runs.c.finished_at - runs.c.started_at)
    counts = [func.count().filter(runs.c.status == s).label(s) for s in ALL_STATUSES]
    stmt = _filtered(
        select(
            bucket,
            runs.c.project,
            runs.c.name,
            *counts,
            func.percentile_cont(0.5).within_group(duration).label("p50"),
            func.percentile_cont(0.95).within_group(duration).label("p95"),
            func.max(duration).label("max"),
            func.coalesce(func.sum(runs.c.cost_usd), 0).label("cost"),
            func.coalesce(func.sum(runs.c.tokens_in), 0).label("tokens_in"),
            func.coalesce(func.sum(runs.c.tokens_out), 0).label("tokens_out"),
        ).where(runs.c.finished_at >= start, runs.c.finished_at < end),
        runs,
        project,
        name,
    )
    stmt = stmt.group_by(bucket, runs.c.project, runs.c.name).order_by(
        bucket, runs.c.project, runs.c.name
    )
    return [
        Bucket(
            period_start=row["bucket"].astimezone(UTC),
            project=row["project"],
            name=row["name"],
            counts={s: row[s] for s in ALL_STATUSES if row[s]},
            duration_p50_s=_float(row["p50"]),
            duration_p95_s=_float(row["p95"]),
            duration_max_s=_float(row["max"]),
            cost_usd=Decimal(row["cost"]),
            tokens_in=row["tokens_in"],
            tokens_out=row["tokens_out"],
        )
        for row in conn.execute(stmt.limit(limit)).mappings()
    ]


def _from_runs_py(
    conn: Connection,
    period: str,
    start: datetime,
    end: datetime,
    project: str | None,
    name: str | None,
    max_rows: int | None,
) -> list[Bucket]:
    stmt = _filtered(
        select(
            runs.c.finished_at,
            runs.c.project,
            runs.c.name,
            runs.c.status,
            runs.c.started_at,
            runs.c.cost_usd,
            runs.c.tokens_in,
            runs.c.tokens_out,
        ).where(runs.c.finished_at >= start, runs.c.finished_at < end),
        runs,
        project,
        name,
    )
    rows = conn.execute(stmt if max_rows is None else stmt.limit(max_rows + 1)).all()
    if max_rows is not None and len(rows) > max_rows:
        raise InvalidInput(
            f"since: more than {max_rows} runs in this window; ask for a shorter one",
            field="since",
        )
    groups: dict[tuple[datetime, str, str], list[Any]] = {}
    for row in rows:
        groups.setdefault((floor(row.finished_at, period), row.project, row.name), []).append(row)
    buckets = []
    for (when, proj, nm), members in groups.items():
        durations = sorted(
            (r.finished_at - r.started_at).total_seconds()
            for r in members
            if r.started_at is not None and r.finished_at is not None
        )
        counts: dict[str, int] = {}
        for r in members:
            counts[r.status] = counts.get(r.status, 0) + 1
        buckets.append(
            Bucket(
                period_start=when,
                project=proj,
                name=nm,
                counts=counts,
                duration_p50_s=_percentile(durations, 0.5),
                duration_p95_s=_percentile(durations, 0.95),
                duration_max_s=durations[-1] if durations else None,
                cost_usd=sum((Decimal(r.cost_usd or 0) for r in members), Decimal(0)),
                tokens_in=sum(int(r.tokens_in or 0) for r in members),
                tokens_out=sum(int(r.tokens_out or 0) for r in members),
            )
        )
    return buckets


def _percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks, as PostgreSQL's percentile_cont."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
