"""Cancel or retry many runs at once: the runs a filter (or a selection) matches, counted
first, then acted on as that same set.

A person sees the count on a confirmation page before anything changes. Runs made after that
page must not be swept in, so the count comes with a bound, the newest (created_at, id) it saw,
and the action takes only runs at or below it. A run that left the action's states meanwhile
(a cancelled run finished on its own) is skipped, never changed twice.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import structlog
from sqlalchemy import ColumnElement, Connection, and_, func, or_, select

from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput
from domain.flow import concurrency
from domain.ports import Publisher
from domain.runs import control
from domain.runs.enqueue import Enqueued, enqueue_many
from domain.runs.repository import RunFilter, matching
from domain.runs.states import TERMINAL
from domain.security import audit

log = structlog.get_logger("conveyor.runs")

#: The most runs one bulk action changes; past it the filter must be narrowed.
MAX_BULK = 10_000

Action = Literal["cancel", "retry"]
ACTIONS: tuple[Action, ...] = ("cancel", "retry")


@dataclass(frozen=True, slots=True)
class Bound:
    """The newest run a count saw; the action takes nothing newer."""

    created_at: datetime
    run_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Preview:
    action: Action
    count: int
    bound: Bound | None  # None: nothing matched


@dataclass(frozen=True, slots=True)
class Outcome:
    action: Action
    changed: list[uuid.UUID]  # cancel: the runs cancelled; retry: the runs retried
    made: list[uuid.UUID]  # retry: the new runs, one per retried run


class TooManyRuns(InvalidInput):
    """The filter matches more runs than one bulk action may change; narrow it."""


def check_action(action: str) -> Action:
    if action not in ACTIONS:
        raise InvalidInput(
            f"action: expected one of {', '.join(ACTIONS)} (got {action!r})", field="action"
        )
    return action


def _conditions(
    filters: RunFilter, action: Action, bound: Bound | None
) -> list[ColumnElement[bool]]:
    """The filter, narrowed to runs the action applies to (cancel: unfinished; retry: finished)
    and, given a bound, to runs no newer than it."""
    conditions = matching(filters)
    if action == "cancel":
        conditions.append(runs.c.status.not_in(TERMINAL))
    else:
        conditions.append(runs.c.status.in_(TERMINAL))
    if bound is not None:
        conditions.append(
            or_(
                runs.c.created_at < bound.created_at,
                and_(runs.c.created_at == bound.created_at, runs.c.id <= bound.run_id),
            )
        )
    return conditions


def _too_many(count: int) -> TooManyRuns:
    return TooManyRuns(
        f"the filter matches more than {MAX_BULK:,} runs ({count:,} counted); "
        "a bulk action changes at most that many: narrow the filter (a time range, a status)",
        limit=MAX_BULK,
    )


def preview(uow: UnitOfWork, filters: RunFilter, action: str) -> Preview:
    """How many runs `action` would change now, and the bound that keeps it to them.
    Counts at most MAX_BULK + 1 rows: past the cap the answer is TooManyRuns, not a scan."""
    chosen = check_action(action)
    conditions = _conditions(filters, chosen, None)
    with uow:
        capped = select(runs.c.id).where(*conditions).limit(MAX_BULK + 1).subquery()
        count = uow.conn.execute(select(func.count()).select_from(capped)).scalar_one()
        if count > MAX_BULK:
            raise _too_many(count)
        newest = uow.conn.execute(
            select(runs.c.created_at, runs.c.id)
            .where(*conditions)
            .order_by(runs.c.created_at.desc(), runs.c.id.desc())
            .limit(1)
        ).first()
    bound = Bound(newest.created_at, newest.id) if newest is not None else None
    return Preview(chosen, int(count), bound)


def _targets(conn: Connection, filters: RunFilter, action: Action, bound: Bound) -> list[uuid.UUID]:
    rows = conn.execute(
        select(runs.c.id)
        .where(*_conditions(filters, action, bound))
        .order_by(runs.c.created_at, runs.c.id)
        .limit(MAX_BULK + 1)
    )
    found = list(rows.scalars())
    if len(found) > MAX_BULK:
        raise _too_many(len(found))
    return found


def cancel_matching(
    uow: UnitOfWork, filters: RunFilter, bound: Bound, *, actor: str, ip: str | None = None
) -> Outcome:
    """Cancel the unfinished runs `filters` matches up to `bound`, in one transaction, each
    as `cancel_run` would (children too), each audited as `run.cancel`, and the whole as
    `runs.bulk_cancel`."""
    with uow:
        now = uow.clock()
        why = f"cancelled in bulk by {actor}"
        ids = _targets(uow.conn, filters, "cancel", bound)
        for run_id in ids:  # all unfinished (`_targets`), so each is cancelled or asked to stop
            control.cancel_one(uow, run_id, now, why, actor=actor, ip=ip, details={"bulk": True})
        concurrency.hand_on(uow.conn, ids, now=now, publishing=False)
        _audit_bulk(uow.conn, "runs.bulk_cancel", actor, ip, now, filters, bound, len(ids))
        uow.commit()
    log.info("runs.bulk_cancelled", count=len(ids), actor=actor)
    return Outcome("cancel", ids, [])


def retry_matching(
    uow: UnitOfWork,
    filters: RunFilter,
    bound: Bound,
    *,
    actor: str,
    ip: str | None = None,
    publisher: Publisher | None = None,
) -> Outcome:
    """Retry the finished runs `filters` matches up to `bound`: one new run each, as
    `retry_run` makes them, enqueued in one transaction with a `run.retry` audit row each
    and one `runs.bulk_retry` for the whole."""
    with uow:
        ids = _targets(uow.conn, filters, "retry", bound)
        olds = [uow.runs.get(run_id) for run_id in ids]
    if not olds:
        return Outcome("retry", [], [])
    reqs = [control.retry_request(old, actor) for old in olds]

    def audit_retries(conn: Connection, results: list[Enqueued]) -> None:
        now = uow.clock()
        for old, made in zip(olds, results, strict=True):
            audit.add(
                conn,
                actor=actor,
                action="run.retry",
                target_type="run",
                target_id=str(old.id),
                details={"new_run_id": str(made.run.id), "bulk": True},
                ip=ip,
                ts=now,
            )
        _audit_bulk(conn, "runs.bulk_retry", actor, ip, now, filters, bound, len(olds))

    made = enqueue_many(uow, reqs, publisher=publisher, record=audit_retries)
    log.info("runs.bulk_retried", count=len(made), actor=actor)
    return Outcome("retry", ids, [m.run.id for m in made])


def _audit_bulk(
    conn: Connection,
    action: str,
    actor: str,
    ip: str | None,
    now: datetime,
    filters: RunFilter,
    bound: Bound,
    count: int,
) -> None:
    described = {
        "status": list(filters.status),
        "name": filters.name,
        "project": filters.project,
        "queue": filters.queue,
        "created_after": filters.created_after.isoformat() if filters.created_after else None,
        "created_before": filters.created_before.isoformat() if filters.created_before else None,
        "error": filters.error,
        "selected": len(filters.ids),
    }
    audit.add(
        conn,
        actor=actor,
        action=action,
        target_type="runs",
        target_id=None,
        details={
            "count": count,
            "filter": {k: v for k, v in described.items() if v},
            "up_to": f"{bound.created_at.isoformat()}|{bound.run_id}",
        },
        ip=ip,
        ts=now,
    )
