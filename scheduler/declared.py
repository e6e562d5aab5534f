"""Schedules declared in code (`@task(schedule=...)`): synced into the schedules table when a
scheduler becomes leader; one removed from the code is disabled, not left firing."""

from __future__ import annotations

import structlog
from sqlalchemy import Engine

from domain import schedules as sched
from domain.clock import Clock, utc_now
from domain.registry import Registry, RegistryCatalog
from scheduler.triggers import Slots, TriggerSpec

log = structlog.get_logger("conveyor.scheduler")


def schedule_name(task_name: str) -> str:
    return f"task:{task_name}"


def sync_code_schedules(engine: Engine, registry: Registry, *, clock: Clock = utc_now) -> list[str]:
    """Upsert every declared schedule; returns the names disabled because they are gone."""
    keep: set[str] = set()
    catalog = RegistryCatalog(registry)
    for task_name in registry.names():
        decl = registry.get(task_name).schedule
        if decl is None:
            continue
        name = schedule_name(task_name)
        spec = sched.ScheduleInput.parse(
            name=name,
            target=task_name,
            params=decl.params,
            trigger=decl.trigger,
            expression=decl.expression,
            timezone=decl.timezone,
            misfire_policy=decl.misfire_policy,
            catch_up_limit=decl.catch_up_limit,
            overlap_policy=decl.overlap_policy,
            source="code",
        )
        slots = Slots(TriggerSpec(spec.trigger, spec.expression, spec.timezone))
        sched.add_schedule(engine, spec, slots, now=clock(), catalog=catalog, replace=True)
        keep.add(name)
    gone = sched.disable_missing(engine, "code", keep, now=clock())
    for name in gone:
        log.warning("schedule.disabled", schedule=name, reason="no longer declared in code")
    return gone
