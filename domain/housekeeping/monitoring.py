"""Numbers for monitoring, read from the database: recent runs by name and status, their
durations, the backlog, and how late the oldest due run is (what Prometheus scrapes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, case, func, literal_column, select

from domain.db import sql
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.runs.states import Status

DURATION_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600)


@dataclass(frozen=True, slots=True)
class Durations:
    """Cumulative bucket counts (le=bound) of finished runs' durations, as Prometheus wants."""

    buckets: list[tuple[float, int]]
    count: int
    total_s: float


@dataclass(frozen=True)
class RunSnapshot:
    window_s: float
    recent: dict[tuple[str, str], int] = field(default_factory=dict)  # (name, status) -> n
    durations: dict[str, Durations] = field(default_factory=dict)  # name -> histogram
    active: dict[str, int] = field(default_factory=dict)  # pending/running -> n
    oldest_due_age_s: float = 0.0
    pending_queues: list[str] = field(default_factory=list)


def snapshot(
    uow: UnitOfWork, *, now: datetime, window_s: float, buckets: Sequence[float] = DURATION_BUCKETS
) -> RunSnapshot:
    """One consistent read of everything; each query is bounded by an index (created_at, the
    pending partial index, or status), never a scan of all history."""
    since = now.timestamp() - window_s
    since_dt = datetime.fromtimestamp(since, tz=now.tzinfo)
    with uow:
        conn = uow.conn
        recent = {
            (row.name, row.status): int(row.n)
            for row in conn.execute(
                select(runs.c.name, runs.c.status, func.count().label("n"))
                .where(runs.c.created_at >= since_dt)
                .group_by(runs.c.name, runs.c.status)
            )
        }
        durations = _durations(conn, since_dt, buckets)
        active = {
            row.status: int(row.n)
            for row in conn.execute(
                select(runs.c.status, func.count().label("n"))
                .where(runs.c.status.in_([Status.PENDING.value, Status.RUNNING.value]))
                .group_by(runs.c.status)
            )
        }
        oldest = conn.execute(
            select(func.min(runs.c.not_before)).where(
                runs.c.status == Status.PENDING.value, runs.c.not_before <= now
            )
        ).scalar()
        queues = _pending_queues(conn)
    oldest_age = 0.0
    if oldest is not None:
        oldest_age = max(0.0, (now - _aware(oldest, now)).total_seconds())
    return RunSnapshot(window_s, recent, durations, active, oldest_age, queues)


def pending_queues(uow: UnitOfWork) -> list[str]:
    """Queues that pending runs wait on (the broker's queues worth asking about)."""
    with uow:
        return _pending_queues(uow.conn)


def _pending_queues(conn: Connection) -> list[str]:
    stmt = select(runs.c.queue).where(runs.c.status == Status.PENDING.value).distinct()
    return sorted(conn.execute(stmt).scalars())


def _aware(value: datetime, like: datetime) -> datetime:
    # min() over a TypeDecorator column comes back raw (naive) on SQLite.
    return value if value.tzinfo is not None else value.replace(tzinfo=like.tzinfo)


def _durations(conn: Connection, since: datetime, buckets: Sequence[float]) -> dict[str, Durations]:
    duration = sql.seconds_between(conn, runs.c.started_at, runs.c.finished_at)
    columns = [
        func.sum(case((duration <= bound, 1), else_=0)).label(f"b{i}")
        for i, bound in enumerate(buckets)
    ]
    stmt = (
        select(
            runs.c.name,
            func.count().label("n"),
            func.coalesce(func.sum(duration), literal_column("0")).label("total"),
            *columns,
        )
        .where(
            runs.c.created_at >= since,
            runs.c.finished_at.is_not(None),
            runs.c.started_at.is_not(None),
        )
        .group_by(runs.c.name)
    )
    result: dict[str, Durations] = {}
    for row in conn.execute(stmt).mappings():
        result[row["name"]] = Durations(
            buckets=[(bound, int(row[f"b{i}"] or 0)) for i, bound in enumerate(buckets)],
            count=int(row["n"]),
            total_s=float(row["total"] or 0),
        )
    return result
