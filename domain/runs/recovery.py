"""Recovery sweeps: the relay (re-)publishes undelivered runs, the reaper recovers lost ones."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    and_,
    delete,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from domain.clock import Clock
from domain.costs import reservations
from domain.db import sql
from domain.db.models import runs, workers
from domain.errors import BrokerUnavailable
from domain.flow import concurrency
from domain.ports import Dispatch, Publisher, send_later
from domain.runs import dispatch
from domain.runs.states import Status
from domain.storage import turn_giver

log = structlog.get_logger("conveyor.recovery")

#: Re-publishing backs off per run (grace, 2x, 4x, … up to this factor), so a run that only
#: waits in a long queue is not re-sent every sweep.
MAX_GRACE_FACTOR = 32


@dataclass(frozen=True, slots=True)
class RelayResult:
    published: int
    republished: int  # of those, runs that had been published before (broker lost them?)


def relay_once(
    engine: Engine,
    publisher: Publisher,
    *,
    clock: Clock,
    grace_s: float,
    limit: int = 1000,
    in_flight: int = 0,
) -> RelayResult:
    """Publish pending runs that are due and unpublished, or published but still unclaimed.

    The rows are locked while publishing (SKIP LOCKED on PostgreSQL), so two relays never send
    the same run twice in one sweep; a broker failure marks nothing and the next sweep retries.
    With fair share on (`in_flight`, domain/flow/fair.py), runs waiting for their project's turn
    are left to the turns, which the sweep then tops up: the net for a top-up a worker lost.
    """
    now = clock()
    stale = now - timedelta(seconds=grace_s)
    unpublished: ColumnElement[bool] = runs.c.dispatched_at.is_(None)
    if in_flight:
        unpublished = and_(unpublished, or_(~runs.c.paced, runs.c.status != Status.PENDING))
    stmt = (
        select(
            runs.c.id,
            runs.c.name,
            runs.c.queue,
            runs.c.priority,
            runs.c.params,
            runs.c.dispatched_at,
            runs.c.dispatch_attempts,
        )
        .where(
            or_(runs.c.status == Status.PENDING, runs.c.status == Status.WAITING),
            runs.c.not_before <= now,
            or_(unpublished, runs.c.dispatched_at < stale),
        )
        .order_by(runs.c.not_before)
        .limit(limit)
    )
    turns = publish_turns(engine, publisher, limit=in_flight, now=now) if in_flight else 0
    with engine.begin() as conn:
        stmt = sql.for_update(conn, stmt, skip_locked=True)
        rows = conn.execute(stmt).all()
        due = [r for r in rows if r.dispatched_at is None or _backoff_over(r, now, grace_s)]
        if not due:
            return RelayResult(turns, 0)
        dispatches = [Dispatch(r.id, r.name, r.queue, r.priority, r.params) for r in due]
        try:
            publisher.publish(dispatches)
        except BrokerUnavailable as exc:
            log.warning("relay.broker_unavailable", pending=len(due), reason=str(exc))
            return RelayResult(0, 0)
        dispatch.mark_dispatched(conn, [d.run_id for d in dispatches], now=now)
    republished = sum(1 for r in due if r.dispatched_at is not None)
    if republished:
        log.warning("relay.republished", count=republished, hint="published but never claimed")
    return RelayResult(turns + len(due), republished)


def publish_turns(
    engine: Engine,
    publisher: Publisher,
    *,
    limit: int,
    now: datetime,
    queues: list[str] | None = None,
    at_least: int = 1,
) -> int:
    """Top up `queues` (None: every queue with runs waiting for a turn) in turns between
    projects (domain/flow/fair.py) and publish what got a place; how many were published."""
    sent = turn_giver(engine).give(queues, limit=limit, now=now, at_least=at_least)
    if sent:
        send_or_hand_back(
            lambda: publisher.publish(sent), engine, [d.run_id for d in sent], marked_at=now
        )
    return len(sent)


def send_or_hand_back(
    send: Callable[[], None], engine: Engine, run_ids: list[uuid.UUID], *, marked_at: datetime
) -> None:
    """Send runs marked dispatched at `marked_at` after their commit; if the broker cannot be
    reached, hand them back to the relay (`hand_back`)."""
    try:
        send()
    except BrokerUnavailable as exc:
        # The runs are committed: the relay publishes them as soon as it reaches the broker.
        log.warning("run.publish_deferred", count=len(run_ids), reason=str(exc))
        hand_back(engine, run_ids, marked_at=marked_at)


def send_unconfirmed_or_hand_back(
    publisher: Publisher, engine: Engine, dispatches: list[Dispatch], *, marked_at: datetime
) -> None:
    """`send_or_hand_back`, without waiting for the broker's confirmation where the publisher
    can (its `send_unconfirmed`): the runs go back to the relay as soon as it is known the
    broker did not take them, or now if it cannot be reached. (A process that dies before it
    hears leaves them to the relay's grace, as any publish lost with its process.)"""
    run_ids = [d.run_id for d in dispatches]
    unconfirmed = getattr(publisher, "send_unconfirmed", None)
    if unconfirmed is None:
        send_or_hand_back(send_later(publisher, dispatches), engine, run_ids, marked_at=marked_at)
        return

    def lost() -> None:
        log.warning("run.publish_lost", count=len(run_ids), hint="the relay publishes them")
        hand_back(engine, run_ids, marked_at=marked_at)

    send_or_hand_back(lambda: unconfirmed(dispatches, lost), engine, run_ids, marked_at=marked_at)


def hand_back(engine: Engine, run_ids: list[uuid.UUID], *, marked_at: datetime) -> None:
    """Runs whose publish right after commit failed (the broker is down) go back to the relay,
    which publishes them at its first sweep that reaches the broker, rather than a dispatch
    grace later. Best effort: should the database fail too, the grace still applies."""
    try:
        with engine.begin() as conn:
            dispatch.unmark_dispatched(conn, run_ids, marked_at=marked_at)
    except SQLAlchemyError as exc:
        log.warning(
            "relay.hand_back_failed",
            count=len(run_ids),
            reason=str(getattr(exc, "orig", None) or exc),
            hint="published by the relay after CONVEYOR_DISPATCH_GRACE_S instead",
        )


def _backoff_over(
    row: Row[Any, Any, Any, Any, Any, Any, Any], now: datetime, grace_s: float
) -> bool:
    attempts = max(1, int(row.dispatch_attempts))
    factor = min(MAX_GRACE_FACTOR, 2 ** (attempts - 1))
    return bool(row.dispatched_at < now - timedelta(seconds=grace_s * factor))


def reap_once(engine: Engine, *, clock: Clock) -> tuple[int, int]:
    """Runs whose lease expired: re-queued (attempts left) or failed as WorkerLost."""
    with engine.begin() as conn:
        now = clock()
        requeued, failed = reap_expired(conn, now=now)
        reservations.release_held(conn, [*requeued, *failed], now=now)
        # Their slots are free now: the keys' waiters are due, and the relay sends them.
        concurrency.hand_on(conn, [*requeued, *failed], now=now, publishing=False)
    for run_id in requeued:
        log.warning("run.lease_expired", run_id=str(run_id), action="requeued")
    for run_id in failed:
        log.warning("run.lease_expired", run_id=str(run_id), action="failed")
    return len(requeued), len(failed)


def forget_dead_workers(engine: Engine, *, clock: Clock, older_than_s: float = 86400) -> int:
    """Registry rows of workers silent for a day go (listings show them as lost before)."""
    cutoff = clock() - timedelta(seconds=older_than_s)
    with engine.begin() as conn:
        return int(conn.execute(delete(workers).where(workers.c.heartbeat_at < cutoff)).rowcount)


def lease_expired(now: datetime) -> ColumnElement[bool]:
    """Running runs whose lease ended before `now`: their worker is gone, and the next sweep
    of the reaper recovers them (until then they are stuck)."""
    return and_(runs.c.status == Status.RUNNING, runs.c.lease_expires_at < now)


def reap_expired(conn: Connection, *, now: datetime) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Runs whose worker stopped heartbeating: re-queue those with attempts left, fail the rest.

    Returns (requeued, failed) run ids.
    """
    expired = lease_expired(now)
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
