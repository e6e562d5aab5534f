"""What the dashboard's overview shows: the backlog of each queue, runs ended per minute with
their failures, the workers, and the runs stuck behind an expired lease."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, func, select

from domain.db import sql
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.runs.reads import WorkerView, list_workers
from domain.runs.recovery import lease_expired
from domain.runs.states import Status
from domain.runs.views import RunView

#: Ended runs that count as failures in the per-minute chart (a cancel is someone's choice).
FAILED: frozenset[str] = frozenset({Status.FAILED, Status.TIMED_OUT, Status.BUDGET_EXCEEDED})
BACKLOG: tuple[str, ...] = (Status.PENDING, Status.RUNNING, Status.WAITING)
STUCK_SHOWN = 50


@dataclass(frozen=True, slots=True)
class QueueBacklog:
    """Runs of one queue not yet ended, by status, and when the oldest queued one was made."""

    queue: str
    pending: int = 0
    running: int = 0
    waiting: int = 0
    #: The oldest pending or waiting run's created_at (None when none is queued).
    oldest_queued_at: datetime | None = None

    def oldest_age_s(self, now: datetime) -> float | None:
        if self.oldest_queued_at is None:
            return None
        return max(0.0, (now - self.oldest_queued_at).total_seconds())


@dataclass(frozen=True, slots=True)
class Minute:
    """Runs that ended within one minute, and how many of them failed."""

    start: datetime
    ended: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Overview:
    now: datetime
    queues: list[QueueBacklog]
    minutes: list[Minute]
    workers: list[WorkerView]
    stuck: list[RunView]


def read_overview(uow: UnitOfWork, *, now: datetime, minutes: int = 60) -> Overview:
    """Everything the overview page shows, as of `now`."""
    with uow:
        queues = _backlog(uow.conn)
        per_minute = _per_minute(uow.conn, now=now, minutes=minutes)
        stuck = stuck_runs(uow.conn, now=now)
    return Overview(now, queues, per_minute, list_workers(uow, now=now), stuck)


def _backlog(conn: Connection) -> list[QueueBacklog]:
    # By status first: ix_runs_status_created answers each group without reading ended runs.
    stmt = (
        select(runs.c.queue, runs.c.status, func.count(), func.min(runs.c.created_at))
        .where(runs.c.status.in_(BACKLOG))
        .group_by(runs.c.queue, runs.c.status)
    )
    found: dict[str, dict[str, int]] = {}
    oldest: dict[str, datetime] = {}
    for queue, status, count, first in conn.execute(stmt):
        found.setdefault(queue, {})[status] = int(count)
        if status != Status.RUNNING and first is not None:
            made = _aware(first)
            oldest[queue] = min(made, oldest.get(queue, made))
    return [
        QueueBacklog(queue, **counts, oldest_queued_at=oldest.get(queue))
        for queue, counts in sorted(found.items())
    ]


def _per_minute(conn: Connection, *, now: datetime, minutes: int) -> list[Minute]:
    """The last `minutes` whole minutes up to and including now's, oldest first, each one
    there even when no run ended in it."""
    first = int(now.timestamp() // 60) - minutes + 1
    since = datetime.fromtimestamp(first * 60, tz=UTC)
    bucket = sql.epoch_minute(conn, runs.c.finished_at).label("minute")
    stmt = (
        select(bucket, runs.c.status, func.count())
        .where(runs.c.finished_at >= since, runs.c.finished_at < since + timedelta(minutes=minutes))
        .group_by(bucket, runs.c.status)
    )
    ended = [0] * minutes
    failed = [0] * minutes
    for minute, status, count in conn.execute(stmt):
        slot = int(minute) - first
        if 0 <= slot < minutes:
            ended[slot] += int(count)
            failed[slot] += int(count) if status in FAILED else 0
    return [Minute(since + timedelta(minutes=i), ended[i], failed[i]) for i in range(minutes)]


def stuck_runs(conn: Connection, *, now: datetime, limit: int = STUCK_SHOWN) -> list[RunView]:
    """Running runs whose lease has expired and that the reaper has not recovered yet,
    longest expired first."""
    stmt = (
        select(*[runs.c[name] for name in RunView.field_names()])
        .where(lease_expired(now))
        .order_by(runs.c.lease_expires_at, runs.c.id)
        .limit(limit)
    )
    return [RunView(*row) for row in conn.execute(stmt)]


def _aware(value: datetime) -> datetime:
    # min() over a TypeDecorator column comes back raw (naive UTC) on SQLite.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
