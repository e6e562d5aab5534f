"""A schedule never stops firing (guarantee 5, "no gap"), with the runner's real APScheduler:
a schedule planned onto an instant that is being fired still fires it, and a plan or a cursor
that falls behind the clock is caught by the watchdog and re-planned under the misfire policy."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from domain import schedules as sched
from domain.clock import utc_now
from domain.models import runs
from domain.ports import Dispatch
from scheduler.schedule_runner import ScheduleRunner
from scheduler.triggers import Slots, TriggerSpec
from tests.fakes import FakePublisher
from tests.polling import eventually

EVERY_SECOND = Slots(TriggerSpec("interval", "1s"))


class HoldingPublisher(FakePublisher):
    """Builds messages ahead like the real publisher; the first `prepare` (called while an
    instant's transaction is staged, before its slot) waits there until the test lets it go,
    so the test acts while that instant is certainly being fired."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.release = threading.Event()

    def prepare(self, dispatches: Sequence[Dispatch]) -> Callable[[], None]:
        if not self.holding.is_set():
            self.holding.set()
            self.release.wait(timeout=10)
        return lambda: self.publish(dispatches)


def every_second(engine: Engine, name: str, **fields: Any) -> sched.ScheduleView:
    spec = sched.ScheduleInput.parse(
        name=name, target="t", trigger="interval", expression="1s", **fields
    )
    return sched.add_schedule(engine, spec, EVERY_SECOND, now=utc_now())


def fires_of(engine: Engine, schedule_id: int) -> list[tuple[datetime, str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(sched.fires.c.fire_at, sched.fires.c.outcome, sched.fires.c.run_id)
            .where(sched.fires.c.schedule_id == schedule_id)
            .order_by(sched.fires.c.fire_at)
        ).all()
    return [(r[0].astimezone(UTC), r[1], r[2]) for r in rows]


def runs_of(engine: Engine, schedule_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(runs)
                .where(runs.c.trigger_ref == f"schedule:{schedule_id}")
            ).scalar_one()
        )


def assert_every_slot_once(engine: Engine, view: sched.ScheduleView) -> list[str]:
    """The schedule's slots from its first one after creation, a second apart, each recorded
    once, one run per enqueued slot; returns the outcomes in slot order."""
    fires = fires_of(engine, view.id)
    assert fires, f"{view.name} never fired"
    times = [f[0] for f in fires]
    assert times[0] == EVERY_SECOND.next_after(view.created_at.astimezone(UTC)), view.name
    assert {b - a for a, b in itertools.pairwise(times)} <= {timedelta(seconds=1)}, view.name
    enqueued = [f for f in fires if f[1] == "enqueued"]
    assert runs_of(engine, view.id) == len(enqueued) == len({f[2] for f in enqueued})
    return [f[1] for f in fires]


@pytest.mark.postgres  # instants are staged ahead of their slot on PostgreSQL only
def test_a_schedule_planned_onto_the_instant_being_fired_fires_it(pg_engine: Engine) -> None:
    """Schedules added while the instant they first fire at is already staged (the half
    second before it) fire that instant right after it, and every slot after."""
    tick = every_second(pg_engine, "tick")
    publisher = HoldingPublisher()
    runner = ScheduleRunner(pg_engine, publisher, misfire_grace_s=60)
    runner.start()
    try:
        assert publisher.holding.wait(timeout=15)
        # The instant is staged and its job is in flight: add schedules due at it, and sync
        # as the leader does when their NOTIFY arrives.
        late = [every_second(pg_engine, f"late-{k}") for k in range(3)]
        runner.sync(force=True)
        publisher.release.set()
        eventually(lambda: all(len(fires_of(pg_engine, v.id)) >= 3 for v in late), timeout=20)
    finally:
        publisher.release.set()
        runner.stop()
    for view in [tick, *late]:
        assert set(assert_every_slot_once(pg_engine, view)) == {"enqueued"}
