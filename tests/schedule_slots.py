"""A schedule's recorded slots, as the tests of guarantee 5 read them: every slot once, in
order, with no gap, and one run per enqueued slot."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select

from domain.db.models import runs
from domain.schedules import definitions as sched
from scheduler.triggers import Slots, TriggerSpec


def fires_and_runs(engine: Engine, schedule_id: int) -> tuple[list[tuple[datetime, str, Any]], int]:
    """The schedule's recorded slots (fire_at in UTC, outcome, run_id) in order, and how many
    runs it made."""
    with engine.connect() as conn:
        slots = conn.execute(
            select(sched.fires.c.fire_at, sched.fires.c.outcome, sched.fires.c.run_id)
            .where(sched.fires.c.schedule_id == schedule_id)
            .order_by(sched.fires.c.fire_at)
        ).all()
        made = conn.execute(
            select(func.count())
            .select_from(runs)
            .where(runs.c.trigger_ref == f"schedule:{schedule_id}")
        ).scalar_one()
    return [(s[0].astimezone(UTC), s[1], s[2]) for s in slots], int(made)


def assert_every_slot_once(engine: Engine, view: Any) -> list[str]:
    """Every slot of the schedule from the first after its creation, each recorded once, one
    run per enqueued slot; returns the outcomes in slot order."""
    slots, made = fires_and_runs(engine, view.id)
    assert slots, f"{view.name} never fired"
    times = [s[0] for s in slots]
    spec = TriggerSpec(view.trigger, view.expression, view.timezone, view.start_at, view.end_at)
    expected = Slots(spec).preview(view.created_at.astimezone(UTC), len(times))
    assert times == expected, f"{view.name}: a gap or a repeat"
    enqueued = [s for s in slots if s[1] == "enqueued"]
    assert made == len(enqueued) == len({s[2] for s in enqueued}), f"{view.name}: runs"
    return [s[1] for s in slots]
