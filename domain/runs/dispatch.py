"""Dispatch marks: which pending runs were published, and which the relay must (re-)send."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, func, or_, select, update

from domain.db.models import runs
from domain.runs.states import Status


def due_for_dispatch(
    conn: Connection, *, now: datetime, grace_s: float, limit: int = 1000
) -> list[tuple[uuid.UUID, str, str, int]]:
    """Pending runs that are due and were never published, or published but not claimed within
    `grace_s` (the broker lost them, or it was flushed): the relay's work list."""
    stale = now - timedelta(seconds=grace_s)
    stmt = (
        select(runs.c.id, runs.c.name, runs.c.queue, runs.c.priority)
        .where(
            runs.c.status.in_((Status.PENDING, Status.WAITING)),
            runs.c.not_before <= now,
            or_(runs.c.dispatched_at.is_(None), runs.c.dispatched_at < stale),
        )
        .order_by(runs.c.not_before)
        .limit(limit)
    )
    return [(r.id, r.name, r.queue, r.priority) for r in conn.execute(stmt)]


def mark_dispatched(conn: Connection, run_ids: list[uuid.UUID], *, now: datetime) -> None:
    if run_ids:
        conn.execute(
            update(runs)
            .where(runs.c.id.in_(run_ids), runs.c.status.in_((Status.PENDING, Status.WAITING)))
            .values(dispatched_at=now, dispatch_attempts=runs.c.dispatch_attempts + 1)
        )


def unmark_dispatched(conn: Connection, run_ids: list[uuid.UUID], *, marked_at: datetime) -> int:
    """Undo `dispatched_at` (set when the runs were made, to be published right after commit)
    for runs whose publish failed, so the relay's next sweep publishes them. Only runs still
    pending and still marked `marked_at`: one the relay has meanwhile re-sent is left alone."""
    if not run_ids:
        return 0
    return int(
        conn.execute(
            update(runs)
            .where(
                runs.c.id.in_(run_ids),
                runs.c.status == Status.PENDING,
                runs.c.dispatched_at == marked_at,
            )
            .values(dispatched_at=None, dispatch_attempts=runs.c.dispatch_attempts - 1)
        ).rowcount
    )


def next_due(engine: Engine, *, now: datetime, within_s: float) -> datetime | None:
    """The earliest time, within the next `within_s`, at which an unpublished pending or
    waiting run falls due (a delay ending, a sleep or a wait's deadline), or None: the relay
    sweeps again right then instead of at its next interval."""
    horizon = now + timedelta(seconds=within_s)
    with engine.connect() as conn:
        found = conn.execute(
            select(func.min(runs.c.not_before)).where(
                runs.c.status.in_((Status.PENDING, Status.WAITING)),
                runs.c.not_before > now,
                runs.c.not_before < horizon,
                runs.c.dispatched_at.is_(None),
            )
        ).scalar()
    return found if isinstance(found, datetime) else None
