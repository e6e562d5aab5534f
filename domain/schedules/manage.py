"""Managing schedules: add, replace, pause, resume, remove and fire one now, and reading them.

Use cases in the one convention of domain/: each takes a UnitOfWork and plain values and
returns views; a change made on behalf of an `actor` writes its audit row in its own
transaction. Validated definitions are domain/schedules/definitions.py; the scheduler's side
(firing slots exactly once) is domain/schedules/fires.py.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import IntegrityError

from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, InvalidInput, NotFound
from domain.ports import Catalog, OpenCatalog, Publisher
from domain.runs import enqueue
from domain.runs.enqueue import Enqueued
from domain.runs.requests import build_request
from domain.runs.views import RunView
from domain.schedules.definitions import (
    ScheduleInput,
    ScheduleView,
    SlotSource,
    announce_change,
    fires,
    schedules,
)
from domain.security import audit


def add_schedule(
    uow: UnitOfWork,
    spec: ScheduleInput,
    slots: SlotSource,
    *,
    now: datetime,
    catalog: Catalog | None = None,
    replace: bool = False,
    actor: str | None = None,
    ip: str | None = None,
) -> ScheduleView:
    """Validate the target and params, then store the schedule with its first fire time.

    A duplicate name is a Conflict unless `replace` (declared schedules are re-synced). With
    an `actor`, audited as schedule.add or schedule.replace."""
    _, params = (catalog or OpenCatalog()).resolve(spec.target, spec.params)
    next_fire = slots.next_after(now)
    if next_fire is None and spec.trigger == "once":
        raise InvalidInput(f"at: {spec.expression} is in the past", field="at")
    values = spec.model_dump(exclude={"target"}) | {
        "target_name": spec.target,
        "params": params,
        "next_fire_at": next_fire,
        "updated_at": now,
    }
    with uow:
        conn = uow.conn
        existing = conn.execute(select(schedules.c.id).where(schedules.c.name == spec.name)).first()
        if existing is not None and not replace:
            raise Conflict(f"name: a schedule named {spec.name!r} already exists", field="name")
        try:
            if existing is None:
                conn.execute(schedules.insert().values(created_at=now, **values))
                announce_change(conn)
            elif _replace(conn, existing[0], values, now):
                announce_change(conn)
        except IntegrityError:
            raise Conflict(f"name: a schedule named {spec.name!r} already exists") from None
        if actor is not None:
            details = {
                "target": spec.target,
                "trigger": spec.trigger,
                "expression": spec.expression,
            }
            action = "schedule.replace" if replace else "schedule.add"
            _audit(uow, actor, ip, action, spec.name, details)
        view = _get(conn, spec.name)
        uow.commit()
    return view


TIMING = ("trigger", "expression", "timezone", "start_at", "end_at")


def _replace(conn: Connection, schedule_id: int, values: dict[str, Any], now: datetime) -> bool:
    """Re-declare a schedule; say whether anything changed. Unchanged: nothing is written
    (syncs on every start are free). New timing: slots of the old definition are not
    "missed", so the cursor moves to now."""
    current = conn.execute(select(schedules).where(schedules.c.id == schedule_id)).mappings().one()
    changed = {
        k: v
        for k, v in values.items()
        if k not in {"updated_at", "next_fire_at"} and current[k] != v
    }
    if not changed:
        return False
    if any(k in changed for k in TIMING):
        values = values | {"last_fire_at": now}
    else:
        values = {k: v for k, v in values.items() if k != "next_fire_at"}
    conn.execute(update(schedules).where(schedules.c.id == schedule_id).values(values))
    return True


def _get(conn: Connection, name: str) -> ScheduleView:
    row = conn.execute(select(schedules).where(schedules.c.name == name)).mappings().first()
    if row is None:
        raise NotFound(f"no schedule named {name!r}", name=name)
    return ScheduleView(dict(row))


def get_schedule(uow: UnitOfWork, name: str) -> ScheduleView:
    with uow:
        return _get(uow.conn, name)


def list_schedules(uow: UnitOfWork) -> list[ScheduleView]:
    with uow:
        rows = uow.conn.execute(select(schedules).order_by(schedules.c.name)).mappings()
        return [ScheduleView(dict(r)) for r in rows]


def recent_fires(uow: UnitOfWork, name: str, limit: int = 20) -> list[dict[str, Any]]:
    with uow:
        conn = uow.conn
        schedule = _get(conn, name)
        rows = conn.execute(
            select(fires.c.fire_at, fires.c.outcome, fires.c.run_id, fires.c.recorded_at)
            .where(fires.c.schedule_id == schedule.id)
            .order_by(fires.c.fire_at.desc())
            .limit(limit)
        ).mappings()
        return [dict(r) for r in rows]


def set_enabled(
    uow: UnitOfWork,
    name: str,
    enabled: bool,
    *,
    now: datetime,
    actor: str | None = None,
    ip: str | None = None,
) -> ScheduleView:
    """Resume (`enabled`) or pause; with an `actor`, audited as schedule.resume or .pause."""
    with uow:
        conn = uow.conn
        found = conn.execute(
            update(schedules)
            .where(schedules.c.name == name)
            .values(enabled=enabled, updated_at=now)
        ).rowcount
        if not found:
            raise NotFound(f"no schedule named {name!r}", name=name)
        announce_change(conn)
        if actor is not None:
            _audit(uow, actor, ip, "schedule.resume" if enabled else "schedule.pause", name)
        view = _get(conn, name)
        uow.commit()
    return view


def remove_schedule(
    uow: UnitOfWork, name: str, *, actor: str | None = None, ip: str | None = None
) -> None:
    """Delete a schedule and its fire history (the runs it made stay)."""
    with uow:
        conn = uow.conn
        if not conn.execute(delete(schedules).where(schedules.c.name == name)).rowcount:
            raise NotFound(f"no schedule named {name!r}", name=name)
        announce_change(conn)
        if actor is not None:
            _audit(uow, actor, ip, "schedule.remove", name)
        uow.commit()


def fire_now(
    uow: UnitOfWork,
    name: str,
    *,
    actor: str,
    ip: str | None = None,
    publisher: Publisher | None = None,
    catalog: Callable[[str], Catalog | None] = lambda kind: None,
) -> RunView:
    """Run the schedule's target now (triggered_by=manual); its own slots are unaffected.
    `catalog` gives the catalog for the target's kind. Audited as schedule.fire, with the
    run, in the run's transaction."""
    view = get_schedule(uow, name)
    req = build_request(
        name=view.target_name,
        params=view.params,
        project=view.project,
        queue=view.queue,
        priority=view.priority,
        kind=view.target_kind,
        triggered_by="manual",
        trigger_ref=f"schedule:{view.id}",
    )

    def audit_fire(conn: Connection, made: list[Enqueued]) -> None:
        details = {"run_id": str(made[0].run.id)}
        audit.add(
            conn,
            actor=actor,
            action="schedule.fire",
            target_type="schedule",
            target_id=name,
            details=details,
            ip=ip,
            ts=uow.clock(),
        )

    enqueued = enqueue.enqueue_many(
        uow, [req], publisher=publisher, catalog=catalog(view.target_kind), record=audit_fire
    )
    return enqueued[0].run


def _audit(
    uow: UnitOfWork,
    actor: str,
    ip: str | None,
    action: str,
    name: str,
    details: dict[str, Any] | None = None,
) -> None:
    audit.record(
        uow,
        actor=actor,
        action=action,
        target_type="schedule",
        target_id=name,
        details=details,
        ip=ip,
    )
