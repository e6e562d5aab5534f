"""The schedule watchdog: every enabled schedule's next fire, checked against the clock.

A schedule's plan lives in the leader's memory (the instant it waits for) and its cursor in
the database (`next_fire_at`, moved after each fire). Either falling behind the clock means
slots are not being fired: a job that never ran, a fire whose cursor could not be moved, a
schedule the plan lost. The watchdog logs each such schedule (`schedule.overdue`, with how
late) and hands it back to the runner, which plans it again from the database's cursor:
slots within the misfire grace fire late, older ones follow the misfire policy, and every
slot is recorded in `schedule_fires`, duplicates of slots already recorded changing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Engine

from domain.clock import Clock, utc_now
from domain.schedules import definitions as sched
from scheduler.schedule_runner import ScheduleRunner

log = structlog.get_logger("conveyor.scheduler")

#: An instant is fired by then (a thousand schedules take well under a second), and a cursor
#: moved: a schedule this far behind is not just being fired.
OVERDUE_AFTER_S = 3.0
#: How often the leader runs the check (one indexed query).
WATCH_EVERY_S = 5.0


@dataclass(frozen=True)
class Overdue:
    schedule_id: int
    name: str
    due_at: datetime
    late_s: float
    #: "plan": the leader waits for an instant already past; "cursor": the database's next
    #: fire is past while the plan looks fine (reported once per stuck value)
    seen_in: str


class ScheduleWatchdog:
    def __init__(
        self,
        engine: Engine,
        runner: ScheduleRunner,
        *,
        clock: Clock = utc_now,
        overdue_after_s: float = OVERDUE_AFTER_S,
    ) -> None:
        self.engine = engine
        self.runner = runner
        self.clock = clock
        self.overdue_after = timedelta(seconds=overdue_after_s)
        # schedule id -> the stuck next fire already reported: a slot that cannot be made (its
        # task is gone) keeps the cursor there, and re-planning it once is enough
        self._reported: dict[int, datetime] = {}

    def check(self) -> list[Overdue]:
        """Log and re-plan every enabled schedule that is behind; return them."""
        now = self.clock()
        cutoff = now - self.overdue_after
        late_plans = {i: at for i, at in self.runner.planned().items() if at < cutoff}
        found: list[Overdue] = []
        reported: dict[int, datetime] = {}
        for schedule_id, name, next_fire_at in sched.enabled_behind(
            self.engine, before=cutoff, among=late_plans
        ):
            if schedule_id in late_plans:
                found.append(_overdue(schedule_id, name, late_plans[schedule_id], now, "plan"))
            elif next_fire_at is not None and next_fire_at < cutoff:
                reported[schedule_id] = next_fire_at
                if self._reported.get(schedule_id) != next_fire_at:
                    found.append(_overdue(schedule_id, name, next_fire_at, now, "cursor"))
        self._reported = reported
        for o in found:
            log.warning(
                "schedule.overdue",
                schedule=o.name,
                due_at=o.due_at.isoformat(),
                late_s=round(o.late_s, 3),
                seen_in=o.seen_in,
                action="replan",
            )
        if found:
            self.runner.replan([o.schedule_id for o in found])
        return found


def _overdue(schedule_id: int, name: str, due_at: datetime, now: datetime, seen_in: str) -> Overdue:
    return Overdue(schedule_id, name, due_at, (now - due_at).total_seconds(), seen_in)
