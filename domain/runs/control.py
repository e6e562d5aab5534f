"""Runs once made: read one, a page of them, its log lines; cancel one; retry one as a new run."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, select

from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput, InvalidTransition
from domain.flow import concurrency
from domain.ports import Publisher
from domain.runs.enqueue import Enqueued, enqueue_many
from domain.runs.repository import RunFilter
from domain.runs.requests import EnqueueRequest
from domain.runs.states import TERMINAL
from domain.runs.views import LogLine, Page, RunView
from domain.security import audit

log = structlog.get_logger("conveyor.runs")


def get_run(uow: UnitOfWork, run_id: uuid.UUID) -> RunView:
    with uow:
        return uow.runs.get(run_id)


def list_runs(
    uow: UnitOfWork, filters: RunFilter, *, limit: int = 50, cursor: str | None = None
) -> Page:
    with uow:
        return uow.runs.page(filters, limit=limit, cursor=cursor)


def run_logs(
    uow: UnitOfWork, run_id: uuid.UUID, *, after_seq: int = 0, limit: int = 1000
) -> list[LogLine]:
    if after_seq < 0:
        raise InvalidInput(f"after_seq: must not be negative (got {after_seq})", field="after_seq")
    with uow:
        uow.runs.get(run_id)  # a clear RunNotFound rather than an empty list
        return uow.runs.logs(run_id, after_seq=after_seq, limit=limit)


def cancel_one(
    uow: UnitOfWork,
    run_id: uuid.UUID,
    now: datetime,
    why: str,
    *,
    actor: str,
    ip: str | None,
    details: dict[str, Any] | None = None,
) -> bool:
    """In the caller's transaction: end the run `cancelled` (pending or waiting) or ask it to
    stop (running), cancel its unfinished children, and audit `run.cancel` with `details`.
    False, and nothing written, when the run has already ended. The caller hands on any key
    slots the cancelled runs held (`concurrency.hand_on`), once for all of them."""
    if not uow.runs.set_cancelled(run_id, now, why) and not uow.runs.request_cancel(run_id, now):
        return False
    cancel_descendants(uow, run_id, now, f"its parent run {run_id} was cancelled")
    # Through audit.record, like every other audited change: details are masked and bounded.
    audit.record(
        uow,
        actor=actor,
        action="run.cancel",
        target_type="run",
        target_id=str(run_id),
        details={"reason": why, **(details or {})},
        ip=ip,
    )
    return True


def cancel_run(
    uow: UnitOfWork, run_id: uuid.UUID, *, actor: str, reason: str = "", ip: str | None = None
) -> RunView:
    """A pending or waiting run ends `cancelled` at once; a running one is asked to stop.
    Its unfinished children (and theirs) are cancelled with it.

    Cancelling a run that already finished is a Conflict naming its state.
    """
    with uow:
        now = uow.clock()
        if not cancel_one(uow, run_id, now, reason or f"cancelled by {actor}", actor=actor, ip=ip):
            run = uow.runs.get(run_id)  # RunNotFound if it never existed
            raise InvalidTransition(
                f"run {run_id} already ended as {run.status}; there is nothing to cancel",
                status=run.status,
            )
        # A cancelled waiter may have been handed a slot it will not take now.
        concurrency.hand_on(uow.conn, [run_id], now=now, publishing=False)
        run = uow.runs.get(run_id)
        uow.commit()
    log.info("run.cancel_requested", run_id=str(run_id), status=run.status, actor=actor)
    return run


def retry_run(
    uow: UnitOfWork,
    run_id: uuid.UUID,
    *,
    actor: str,
    ip: str | None = None,
    publisher: Publisher | None = None,
) -> RunView:
    """A terminal run → a new pending run with the same target and params (`parent_run_id`),
    audited as `run.retry` of the old run in the new run's transaction."""
    with uow:
        old = uow.runs.get(run_id)
        if old.status not in TERMINAL:
            raise InvalidTransition(
                f"run {run_id} is {old.status}; only a finished run can be retried",
                status=old.status,
            )
    req = retry_request(old, actor)

    def audit_retry(conn: Connection, results: list[Enqueued]) -> None:
        audit.add(
            conn,
            actor=actor,
            action="run.retry",
            target_type="run",
            target_id=str(run_id),
            details={"new_run_id": str(results[0].run.id)},
            ip=ip,
            ts=uow.clock(),
        )

    new = enqueue_many(uow, [req], publisher=publisher, record=audit_retry)[0].run
    log.info("run.retried", run_id=str(new.id), parent_run_id=str(old.id), actor=actor)
    return new


def retry_request(old: RunView, actor: str) -> EnqueueRequest:
    """A new run of `old`'s target and params, as its retry (`parent_run_id`)."""
    return EnqueueRequest(
        name=old.name,
        params=old.params,
        project=old.project,
        queue=old.queue,
        priority=old.priority,
        max_attempts=old.max_attempts,
        timeout_s=old.timeout_s,
        budget_usd=old.budget_usd,
        max_requests=old.max_requests,
        max_minutes=old.max_minutes,
        kind=old.kind,
        triggered_by="retry",
        trigger_ref=actor,
        parent_run_id=old.id,
    )


def cancel_descendants(uow: UnitOfWork, run_id: uuid.UUID, now: datetime, why: str) -> None:
    """Cancel the unfinished runs spawned by `run_id`, and theirs, in the caller's transaction."""
    frontier = [run_id]
    while frontier:
        children = (
            uow.conn.execute(
                select(runs.c.id).where(
                    runs.c.parent_run_id.in_(frontier),
                    runs.c.triggered_by == "spawn",
                    runs.c.status.not_in(TERMINAL),
                )
            )
            .scalars()
            .all()
        )
        for child in children:
            if not uow.runs.set_cancelled(child, now, why):
                uow.runs.request_cancel(child, now)
        frontier = list(children)
