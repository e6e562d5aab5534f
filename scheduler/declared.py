"""Schedules declared in code (`@task(schedule=...)`): synced into the schedules table when a
scheduler becomes leader; one removed from the code is disabled, not left firing."""

from __future__ import annotations

import structlog
from sqlalchemy import Engine

from domain.clock import Clock, utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ConveyorError
from domain.pipelines.discovery import PipelineDirectory
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.tasks.registry import Registry, RegistryCatalog
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
        manage.add_schedule(
            UnitOfWork(engine), spec, slots, now=clock(), catalog=catalog, replace=True
        )
        keep.add(name)
    gone = sched.disable_missing(engine, "code", keep, now=clock())
    for name in gone:
        log.warning("schedule.disabled", schedule=name, reason="no longer declared in code")
    return gone


def pipeline_schedule_name(pipeline: str) -> str:
    return f"pipeline:{pipeline}"


def sync_pipeline_schedules(
    engine: Engine, directory: PipelineDirectory, *, clock: Clock = utc_now
) -> list[str]:
    """pipeline.json's schedule_cron / schedule_interval_seconds / run_once_at (with
    schedule_start, schedule_end, timezone) as schedules of the pipeline; a schedule whose
    pipeline dropped it, was disabled or vanished is disabled. Returns the disabled names."""
    keep: set[str] = set()
    for found in directory.all():
        if not found.runnable or found.config is None:
            continue
        spec = found.config.schedule_spec()
        if spec is None:
            continue
        name = pipeline_schedule_name(found.name)
        try:
            schedule = sched.ScheduleInput.parse(
                name=name, target=found.name, target_kind="pipeline", source="pipeline", **spec
            )
            slots = Slots(
                TriggerSpec(
                    schedule.trigger,
                    schedule.expression,
                    schedule.timezone,
                    schedule.start_at,
                    schedule.end_at,
                )
            )
            manage.add_schedule(UnitOfWork(engine), schedule, slots, now=clock(), replace=True)
        except ConveyorError as exc:  # e.g. a run_once_at in the past: say so, keep going
            log.warning("schedule.not_declared", schedule=name, reason=str(exc))
            continue
        keep.add(name)
    gone = sched.disable_missing(engine, "pipeline", keep, now=clock())
    for name in gone:
        log.warning("schedule.disabled", schedule=name, reason="no longer in its pipeline.json")
    return gone
