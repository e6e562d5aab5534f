"""The worker's primitives on a run: claim with a lease, then writes fenced by `attempt`.

Each is one conditional statement, so two workers holding the same message can never both own a
run (guarantee 2), and a worker that lost its lease cannot overwrite the attempt that replaced it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Row, and_, delete, func, or_, select, tuple_, update

from domain.costs import admission
from domain.db.models import run_logs, runs
from domain.errors import LeaseLost
from domain.runs.states import TERMINAL, Status

_CLAIM_COLUMNS = (
    runs.c.id,
    runs.c.name,
    runs.c.kind,
    runs.c.project,
    runs.c.params,
    runs.c.attempt,
    runs.c.max_attempts,
    runs.c.timeout_s,
    runs.c.budget_usd,
    runs.c.max_requests,
    runs.c.max_minutes,
    runs.c.started_at,
    runs.c.queue,
    runs.c.priority,
    runs.c.triggered_by,
)


@dataclass(frozen=True, slots=True)
class Claim:
    """What the executor needs about the run it now owns for `attempt`."""

    run_id: uuid.UUID
    name: str
    kind: str
    project: str
    params: dict[str, Any]
    attempt: int
    max_attempts: int
    timeout_s: float | None
    budget_usd: Any
    max_requests: int | None
    max_minutes: float | None
    started_at: datetime
    queue: str
    priority: int
    triggered_by: str = "api"


def _claimable(now: datetime) -> Any:
    return or_(
        and_(runs.c.status == Status.PENDING, runs.c.not_before <= now),
        and_(
            runs.c.status == Status.RUNNING,
            runs.c.lease_expires_at < now,
            runs.c.attempt < runs.c.max_attempts,
        ),
    )


def claim(
    conn: Connection, run_id: uuid.UUID, *, owner: str, now: datetime, lease_s: float
) -> Claim | admission.Refused | None:
    """Take the run if it is due and unowned: pending, or running with an expired lease and
    attempts left. Bumps `attempt` and sets the lease. None means: not ours, drop the message.

    A run whose project is at a monthly limit, or whose parent spent its budget, is not taken:
    `Refused` says it was ended or held instead (domain/costs/admission.py). Runs with nothing to
    check are claimed by the first statement; only the others read their limits."""
    return _take(
        conn, run_id, and_(_claimable(now), admission.NOTHING_TO_CHECK), owner, now, lease_s
    ) or (claim_checked(conn, run_id, owner=owner, now=now, lease_s=lease_s))


def claim_checked(
    conn: Connection, run_id: uuid.UUID, *, owner: str, now: datetime, lease_s: float
) -> Claim | admission.Refused | None:
    """`claim` for a run that may have limits to check: admit it, then take it."""
    admitted = admission.admit(conn, run_id, _claimable(now), now=now)
    if isinstance(admitted, admission.Refused):
        return admitted
    if not admitted:
        return None
    return _take(conn, run_id, _claimable(now), owner, now, lease_s)


def _take(
    conn: Connection, run_id: uuid.UUID, claimable: Any, owner: str, now: datetime, lease_s: float
) -> Claim | None:
    stmt = (
        update(runs)
        .where(runs.c.id == run_id, claimable)
        .values(
            status=Status.RUNNING,
            attempt=runs.c.attempt + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            started_at=func.coalesce(runs.c.started_at, now),
        )
        .returning(*_CLAIM_COLUMNS)
    )
    row = conn.execute(stmt).mappings().first()
    if row is None:
        return None
    return Claim(
        run_id=row["id"],
        name=row["name"],
        kind=row["kind"],
        project=row["project"],
        params=row["params"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        timeout_s=row["timeout_s"],
        budget_usd=row["budget_usd"],
        max_requests=row["max_requests"],
        max_minutes=row["max_minutes"],
        started_at=row["started_at"],
        queue=row["queue"],
        priority=row["priority"],
        triggered_by=row["triggered_by"],
    )


def _owned(run_id: uuid.UUID, attempt: int) -> Any:
    return and_(runs.c.id == run_id, runs.c.attempt == attempt, runs.c.status == Status.RUNNING)


def heartbeat(
    conn: Connection, run_id: uuid.UUID, attempt: int, *, now: datetime, lease_s: float
) -> bool:
    """Extend the lease. Returns True when a cancel was requested; raises LeaseLost if not ours."""
    row = conn.execute(
        update(runs)
        .where(_owned(run_id, attempt))
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .returning(runs.c.cancel_requested_at)
    ).first()
    if row is None:
        raise LeaseLost(f"run {run_id} attempt {attempt} no longer owns its lease")
    return row[0] is not None


def finish(
    conn: Connection,
    run_id: uuid.UUID,
    attempt: int,
    *,
    status: str,
    now: datetime,
    result: Any = None,
    error_type: str | None = None,
    error: str | None = None,
    exit_code: int | None = None,
) -> None:
    """Write the terminal state of this attempt; LeaseLost when another attempt owns the run."""
    if status not in TERMINAL:
        raise ValueError(f"finish() needs a terminal status, got {status!r}")
    updated = conn.execute(
        update(runs)
        .where(_owned(run_id, attempt))
        .values(
            status=status,
            result=result,
            error_type=error_type,
            error=error,
            exit_code=exit_code,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
    ).rowcount
    if updated != 1:
        raise LeaseLost(f"run {run_id} attempt {attempt} no longer owns its lease")


def retry_later(
    conn: Connection,
    run_id: uuid.UUID,
    attempt: int,
    *,
    now: datetime,
    not_before: datetime,
    error_type: str | None,
    error: str | None,
) -> None:
    """Back to pending until `not_before` (backoff); the relay publishes it when due."""
    updated = conn.execute(
        update(runs)
        .where(_owned(run_id, attempt))
        .values(
            status=Status.PENDING,
            not_before=not_before,
            dispatched_at=None,
            lease_owner=None,
            lease_expires_at=None,
            error_type=error_type,
            error=error,
        )
    ).rowcount
    if updated != 1:
        raise LeaseLost(f"run {run_id} attempt {attempt} no longer owns its lease")


def release(conn: Connection, run_id: uuid.UUID, attempt: int, *, now: datetime) -> bool:
    """Give the run back at once (graceful shutdown): pending, due now, this attempt not counted."""
    updated = conn.execute(
        update(runs)
        .where(_owned(run_id, attempt))
        .values(
            status=Status.PENDING,
            attempt=runs.c.attempt - 1,
            not_before=now,
            dispatched_at=None,
            lease_owner=None,
            lease_expires_at=None,
        )
    ).rowcount
    return updated == 1


def due_for_dispatch(
    conn: Connection, *, now: datetime, grace_s: float, limit: int = 1000
) -> list[tuple[uuid.UUID, str, str, int]]:
    """Pending runs that are due and were never published, or published but not claimed within
    `grace_s` (the broker lost them, or it was flushed): the relay's work list."""
    stale = now - timedelta(seconds=grace_s)
    stmt = (
        select(runs.c.id, runs.c.name, runs.c.queue, runs.c.priority)
        .where(
            runs.c.status == Status.PENDING,
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
            .where(runs.c.id.in_(run_ids), runs.c.status == Status.PENDING)
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


@dataclass(frozen=True, slots=True)
class Totals:
    """A run's spend after a cost entry, with its limits, to decide whether it must stop."""

    cost_usd: Any
    tokens_in: int
    tokens_out: int
    requests_made: int
    budget_usd: Any
    max_requests: int | None


#: What the per-call path reads back after adding an entry, to decide whether the run stops.
_TOTALS = (
    runs.c.cost_usd,
    runs.c.tokens_in,
    runs.c.tokens_out,
    runs.c.requests_made,
    runs.c.budget_usd,
    runs.c.max_requests,
)


def add_spend(
    conn: Connection,
    owned: Any,
    *,
    usd: Decimal,
    tokens_in: int,
    tokens_out: int,
    requests: int,
    entries: int,
    returning: Sequence[Any] = (),
) -> Row[Any] | None:
    """Add spend and `entries` cost entries to the run `owned` selects, in the caller's
    transaction. Returns the `returning` columns followed by the run's cost_entry_count (the
    seq of the last entry added; the `entries` before it are theirs too), or None when no run
    matched (its attempt no longer owns it)."""
    new_cost: Any
    if conn.dialect.name == "sqlite":
        # Money is text on SQLite (exact); add in Python. Writers are serialised there anyway.
        current = conn.execute(select(runs.c.cost_usd).where(owned)).first()
        if current is None:
            return None
        new_cost = Decimal(current[0]) + usd
    else:
        new_cost = runs.c.cost_usd + usd
    return conn.execute(
        update(runs)
        .where(owned)
        .values(
            cost_usd=new_cost,
            tokens_in=runs.c.tokens_in + tokens_in,
            tokens_out=runs.c.tokens_out + tokens_out,
            requests_made=runs.c.requests_made + requests,
            cost_entry_count=runs.c.cost_entry_count + entries,
        )
        .returning(*returning, runs.c.cost_entry_count)
    ).first()


def record_cost(
    conn: Connection, run_id: uuid.UUID, attempt: int, *, entry: dict[str, Any]
) -> Totals:
    """Add a cost entry and the run's totals in one transaction, fenced by attempt."""
    from domain.db.models import cost_entries

    row = add_spend(
        conn,
        _owned(run_id, attempt),
        usd=Decimal(entry["cost_usd"]),
        tokens_in=entry["tokens_in"],
        tokens_out=entry["tokens_out"],
        requests=entry["requests"],
        entries=1,
        returning=_TOTALS,
    )
    if row is None:
        raise LeaseLost(f"run {run_id} attempt {attempt} no longer owns its lease")
    conn.execute(cost_entries.insert().values(run_id=run_id, seq=row[-1], **entry))
    return Totals(*tuple(row)[:-1])


def lock_for_lines(conn: Connection, run_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Of `run_ids`, the runs that exist, each locked `FOR KEY SHARE` until the transaction
    ends: lines written for them in it cannot outlive them (run_logs has no foreign key; this
    is the lock its check took, once per batch instead of once per line). Locked in id order,
    as every writer locks runs, so two writers never wait on each other in a cycle."""
    if not run_ids:
        return set()
    query = select(runs.c.id).where(runs.c.id.in_(run_ids)).order_by(runs.c.id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(key_share=True, read=True)
    return set(conn.execute(query).scalars())


def delete_runs(conn: Connection, run_ids: Sequence[uuid.UUID]) -> int:
    """Delete runs and their log lines (their other records go by cascade); how many runs.

    The runs first: deleting a row waits for every writer holding it `FOR KEY SHARE`
    (`lock_for_lines`) to commit, so the lines delete that follows sees all their lines, and
    a writer that comes later finds no run and writes nothing. "Sees" needs READ COMMITTED
    (a snapshot per statement): under REPEATABLE READ the lines delete would miss lines
    committed since the transaction began, so callers that may find a stricter server
    default set READ COMMITTED for the transaction (`maintenance.apply_retention` does).
    """
    if not run_ids:
        return 0
    deleted = conn.execute(delete(runs).where(runs.c.id.in_(run_ids))).rowcount
    conn.execute(delete(run_logs).where(run_logs.c.run_id.in_(run_ids)))
    return int(deleted)


def next_seq(conn: Connection, table: Any, run_id: uuid.UUID) -> int:
    """1 + the highest seq a run already has in `table` (run_logs or run_steps)."""
    current = conn.execute(select(func.max(table.c.seq)).where(table.c.run_id == run_id)).scalar()
    return int(current or 0) + 1


def heartbeat_many(
    conn: Connection, owned: list[tuple[uuid.UUID, int]], *, now: datetime, lease_s: float
) -> dict[uuid.UUID, bool]:
    """Extend the leases of many (run, attempt) pairs in one statement.

    Returns {run_id: cancel_requested} for the runs still owned; a pair missing from the result
    lost its lease (reaped, or finished by someone else).
    """
    if not owned:
        return {}
    pairs = [tuple_(runs.c.id, runs.c.attempt) == (rid, att) for rid, att in owned]
    rows = conn.execute(
        update(runs)
        .where(or_(*pairs), runs.c.status == Status.RUNNING)
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .returning(runs.c.id, runs.c.cancel_requested_at)
    ).all()
    return {row[0]: row[1] is not None for row in rows}


def reap_expired(conn: Connection, *, now: datetime) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Runs whose worker stopped heartbeating: re-queue those with attempts left, fail the rest.

    Returns (requeued, failed) run ids.
    """
    expired = and_(runs.c.status == Status.RUNNING, runs.c.lease_expires_at < now)
    requeued = (
        conn.execute(
            update(runs)
            .where(expired, runs.c.attempt < runs.c.max_attempts)
            .values(
                status=Status.PENDING,
                not_before=now,
                dispatched_at=None,
                lease_owner=None,
                lease_expires_at=None,
                error_type="WorkerLost",
                error="the worker stopped heartbeating; the run was queued again",
            )
            .returning(runs.c.id)
        )
        .scalars()
        .all()
    )
    failed = (
        conn.execute(
            update(runs)
            .where(expired, runs.c.attempt >= runs.c.max_attempts)
            .values(
                status=Status.FAILED,
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
                error_type="WorkerLost",
                error="the worker stopped heartbeating and no attempts are left",
            )
            .returning(runs.c.id)
        )
        .scalars()
        .all()
    )
    return list(requeued), list(failed)


def release_owned(conn: Connection, owners: list[str], *, now: datetime) -> list[uuid.UUID]:
    """Give back every run these owners hold (their code was ended): pending and due now, the
    interrupted attempt not counted, so another worker starts it at once."""
    if not owners:
        return []
    return list(
        conn.execute(
            update(runs)
            .where(runs.c.status == Status.RUNNING, runs.c.lease_owner.in_(owners))
            .values(
                status=Status.PENDING,
                attempt=runs.c.attempt - 1,
                not_before=now,
                dispatched_at=None,
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(runs.c.id)
        ).scalars()
    )
