"""The worker's primitives on a run: claim with a lease, then writes fenced by `attempt`.

Each is one conditional statement, so two workers holding the same message can never both own a
run (guarantee 2), and a worker that lost its lease cannot overwrite the attempt that replaced it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, and_, case, func, or_, tuple_, update

from domain.clock import utc_now
from domain.costs import admission
from domain.db.engine import single_statement
from domain.db.models import run_logs, runs
from domain.errors import LeaseLost
from domain.flow import concurrency, rates
from domain.flow.parking import Wait
from domain.ports import Dispatch
from domain.runs import fence, steps
from domain.runs.lines import lock_for_lines
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
    runs.c.concurrency_key,
    runs.c.concurrency_max,
    runs.c.paced,
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
    #: Keyed concurrency (domain/flow/concurrency.py): the slot this attempt holds.
    concurrency_key: str | None = None
    concurrency_max: int | None = None
    #: It waited for its project's turn in a busy queue: claiming it frees a place there.
    paced: bool = False


#: Runs the first claim statement takes at once: nothing to admit (domain/costs/admission.py)
#: and no concurrency key to pass (domain/flow/concurrency.py). The others take the checks.
NOTHING_TO_CHECK = and_(
    admission.NOTHING_TO_CHECK, runs.c.concurrency_key.is_(None), runs.c.rate_limit.is_(None)
)


@dataclass(frozen=True, slots=True)
class Slot:
    """The concurrency key's slot a finishing attempt held: handed on in the finish's own
    transaction (domain/flow/concurrency.py `refill`); `publishing`: the caller publishes the
    runs it makes due (else the relay)."""

    key: str
    most: int
    publishing: bool


@dataclass(frozen=True, slots=True)
class Finished:
    """What a store's finish did: `owned` the attempt still owned the run (its state is
    written); `woken` the runs the slot was handed to, to publish now (even when not owned:
    they are marked published)."""

    owned: bool
    woken: tuple[Dispatch, ...] = ()


def _claimable(now: datetime) -> Any:
    return or_(
        and_(runs.c.status.in_((Status.PENDING, Status.WAITING)), runs.c.not_before <= now),
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
    return _take(conn, run_id, and_(_claimable(now), NOTHING_TO_CHECK), owner, now, lease_s) or (
        claim_checked(conn, run_id, owner=owner, now=now, lease_s=lease_s)
    )


def claim_checked(
    conn: Connection, run_id: uuid.UUID, *, owner: str, now: datetime, lease_s: float
) -> Claim | admission.Refused | None:
    """`claim` for a run that may have limits to check: admit it (spend), let it through its
    key's gate (a slot free, or it waits) and its rate limit's (one request, or it waits),
    then take it."""
    admitted = admission.admit(conn, run_id, _claimable(now), now=now)
    if isinstance(admitted, admission.Refused):
        return admitted
    if not admitted:
        return None
    keyed = concurrency.gate(conn, run_id, _claimable(now), now=now)
    if isinstance(keyed, Wait):
        return _waits(run_id, keyed)
    rated = rates.gate(conn, run_id, _claimable(now), now=now)
    if isinstance(rated, Wait):
        return _waits(run_id, rated)
    if keyed is concurrency.PASSED or rated is rates.PASSED:
        # A lock may have been waited for: the run starts now, not when the claim was asked
        # (else its started_at could precede the end of the run it waited for).
        now = max(now, utc_now())
    return _take(conn, run_id, _claimable(now), owner, now, lease_s)


def _waits(run_id: uuid.UUID, wait: Wait) -> admission.Refused:
    return admission.Refused(
        run_id,
        held=True,
        reason=wait.detail,
        recheck_at=wait.wake_at,
        waits=wait.reason,
        turn_queue=wait.turn_queue,
        woken=wait.woken,
    )


def _take(
    conn: Connection, run_id: uuid.UUID, claimable: Any, owner: str, now: datetime, lease_s: float
) -> Claim | None:
    stmt = (
        update(runs)
        .where(runs.c.id == run_id, claimable)
        .values(
            status=Status.RUNNING,
            # A waiting run goes on with the attempt it slept in; anything else starts one.
            attempt=case(
                (runs.c.status == Status.WAITING, runs.c.attempt), else_=runs.c.attempt + 1
            ),
            wait_reason=None,
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
        concurrency_key=row["concurrency_key"],
        concurrency_max=row["concurrency_max"],
        paced=row["paced"],
    )


def heartbeat(
    conn: Connection, run_id: uuid.UUID, attempt: int, *, now: datetime, lease_s: float
) -> bool:
    """Extend the lease. Returns True when a cancel was requested; raises LeaseLost if not ours."""
    row = conn.execute(
        update(runs)
        .where(fence.owned(run_id, attempt))
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
    _write_owned(
        conn,
        run_id,
        attempt,
        status=status,
        result=result,
        error_type=error_type,
        error=error,
        exit_code=exit_code,
        finished_at=now,
        lease_owner=None,
        lease_expires_at=None,
    )


def suspend(
    conn: Connection,
    run_id: uuid.UUID,
    attempt: int,
    *,
    until: datetime,
    reason: str,
) -> None:
    """The attempt stops executing without ending: the run waits (no lease, no worker) until
    `until`, when the relay delivers it again and a claim goes on with the same attempt."""
    _write_owned(
        conn,
        run_id,
        attempt,
        status=Status.WAITING,
        wait_reason=reason,
        not_before=until,
        dispatched_at=None,
        lease_owner=None,
        lease_expires_at=None,
    )


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
    _write_owned(
        conn,
        run_id,
        attempt,
        status=Status.PENDING,
        not_before=not_before,
        dispatched_at=None,
        lease_owner=None,
        lease_expires_at=None,
        error_type=error_type,
        error=error,
    )


def release(conn: Connection, run_id: uuid.UUID, attempt: int, *, now: datetime) -> bool:
    """Give the run back at once (graceful shutdown): pending, due now, this attempt not counted."""
    updated = conn.execute(
        update(runs)
        .where(fence.owned(run_id, attempt))
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


class RunStore(Protocol):
    """A worker's two writes per run: the claim, and the final state with the attempt's last
    log lines. `domain.storage.run_store` picks the implementation for a database, once; the
    contract tests (tests/integration/test_run_store_contract.py) hold every one to the same
    behaviour. Heartbeats are one statement everywhere (`heartbeat_many`)."""

    #: The most log lines `finish` writes with the state; the executor writes a longer tail
    #: (and metric rows) in its general transaction instead.
    max_inline_lines: int

    def claim(
        self, run_id: uuid.UUID, *, owner: str, now: datetime, lease_s: float
    ) -> Claim | admission.Refused | None:
        """`claim` above: the run for a new attempt, Refused (ended or held at a limit), or
        None when it is not claimable."""
        ...

    def finish(
        self,
        run_id: uuid.UUID,
        attempt: int,
        *,
        status: str,
        now: datetime,
        result: Any,
        error_type: str | None,
        error: str | None,
        exit_code: int | None,
        lines: Sequence[dict[str, Any]],
        slot: Slot | None = None,
    ) -> Finished:
        """Write the final state and `lines` at once, and hand on the `slot` it held; not
        `owned` when `attempt` no longer owns the run (the lines are written all the same,
        labelled with their attempt)."""
        ...

    def record_step(
        self, run_id: uuid.UUID, attempt: int, outcome: steps.Outcome, *, reuse: bool
    ) -> bool:
        """`steps.record`: write a checkpointed step's row as it completed or failed, in one
        statement, while `attempt` owns the run; False when it does not."""
        ...

    def close(self) -> None:
        """Release what the store holds (connections of its own)."""
        ...


class SqlRunStore:
    """RunStore over SQLAlchemy, one transaction per call: every database conveyor supports."""

    max_inline_lines = 500

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def claim(
        self, run_id: uuid.UUID, *, owner: str, now: datetime, lease_s: float
    ) -> Claim | admission.Refused | None:
        with self.engine.begin() as conn:
            return claim(conn, run_id, owner=owner, now=now, lease_s=lease_s)

    def finish(
        self,
        run_id: uuid.UUID,
        attempt: int,
        *,
        status: str,
        now: datetime,
        result: Any,
        error_type: str | None,
        error: str | None,
        exit_code: int | None,
        lines: Sequence[dict[str, Any]],
        slot: Slot | None = None,
    ) -> Finished:
        with self.engine.begin() as conn:
            if lines and lock_for_lines(conn, [run_id]):
                conn.execute(run_logs.insert(), list(lines))
            try:
                with conn.begin_nested():  # a lost fence undoes the state, not the lines
                    finish(
                        conn,
                        run_id,
                        attempt,
                        status=status,
                        now=now,
                        result=result,
                        error_type=error_type,
                        error=error,
                        exit_code=exit_code,
                    )
            except LeaseLost:
                return Finished(False)
            if slot is None:
                return Finished(True)
            woken = concurrency.refill(
                conn, slot.key, slot.most, now=now, publishing=slot.publishing
            )
        return Finished(True, tuple(woken))

    def record_step(
        self, run_id: uuid.UUID, attempt: int, outcome: steps.Outcome, *, reuse: bool
    ) -> bool:
        with single_statement(self.engine) as conn:
            return steps.record(conn, run_id, attempt, outcome, reuse=reuse)

    def close(self) -> None:
        """Nothing of its own: the engine's pool belongs to whoever made the engine."""


def _write_owned(conn: Connection, run_id: uuid.UUID, attempt: int, **values: Any) -> None:
    """Write `values` to the run while `attempt` owns it; LeaseLost when it does not."""
    updated = conn.execute(update(runs).where(fence.owned(run_id, attempt)).values(**values))
    if updated.rowcount != 1:
        raise LeaseLost(f"run {run_id} attempt {attempt} no longer owns its lease")
