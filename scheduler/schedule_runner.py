"""Fires schedules while this process leads: one APScheduler job per schedule, for its next
slot; missed slots follow the misfire policy; every slot is recorded (domain/schedules.py)."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from datetime import datetime, timedelta
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from domain import schedules as sched
from domain.clock import Clock, utc_now
from domain.errors import BrokerUnavailable, ConveyorError
from domain.ports import Catalog, Publisher
from scheduler.triggers import Slots, TriggerSpec

log = structlog.get_logger("conveyor.scheduler")


def slots_for(row: Any) -> Slots:
    return Slots(
        TriggerSpec(
            kind=row.trigger,
            expression=row.expression,
            timezone=row.timezone,
            start_at=row.start_at,
            end_at=row.end_at,
        )
    )


class ScheduleRunner:
    """Owned by the leader. `start()` catches up and plans every schedule, `sync()` picks up
    edits (called about once a second), `stop()` ends all jobs (leadership lost)."""

    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        *,
        catalog: Catalog | None = None,
        clock: Clock = utc_now,
        misfire_grace_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.catalog = catalog
        self.clock = clock
        self.grace = timedelta(seconds=misfire_grace_s)
        self.aps: BackgroundScheduler | None = None
        self._known: dict[int, Any] = {}  # schedule id -> updated_at we planned with
        self._slots: dict[int, Slots] = {}  # schedule id -> its fire times, as planned
        self._marker: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self.aps = BackgroundScheduler(
            timezone="UTC",
            executors={"default": ThreadPoolExecutor(8)},
            job_defaults={"misfire_grace_time": None, "coalesce": False, "max_instances": 1},
        )
        self.aps.start()
        self._known.clear()
        self._marker = None
        self.sync()

    def stop(self) -> None:
        if self.aps is not None:
            self.aps.shutdown(wait=True)
            self.aps = None

    def sync(self) -> None:
        """Re-plan schedules that were added, edited, paused, resumed or removed."""
        marker = sched.changes_marker(self.engine)
        if marker == self._marker:
            return
        self._marker = marker
        rows = {s.id: s for s in sched.list_schedules(self.engine)}
        with self._lock:
            for schedule_id in list(self._known):
                row = rows.get(schedule_id)
                if row is None or not row.enabled:
                    self._unplan(schedule_id)
            for row in rows.values():
                if row.enabled and self._known.get(row.id) != row.updated_at:
                    self._plan(row)

    def _unplan(self, schedule_id: int) -> None:
        self._known.pop(schedule_id, None)
        self._slots.pop(schedule_id, None)
        if self.aps is not None:
            with contextlib.suppress(JobLookupError):
                self.aps.remove_job(str(schedule_id))

    def _plan(self, row: Any) -> None:
        try:
            slots = slots_for(row)
        except ConveyorError as exc:  # stored before a rule changed: report, do not crash
            log.error("schedule.invalid", schedule=row.name, reason=str(exc))
            return
        self._known[row.id] = row.updated_at
        self._slots[row.id] = slots
        now = self.clock()
        cursor = row.last_fire_at or row.created_at
        missed = list(_take(slots.between(cursor, now - self.grace), sched.MAX_RECORDED_MISSES))
        if missed:
            planned = sched.plan_missed(missed, row.misfire_policy, row.catch_up_limit)
            self._record(row.id, planned, next_fire_at=slots.next_after(now - self.grace))
            log.info(
                "schedule.misfired",
                schedule=row.name,
                missed=len(missed),
                policy=row.misfire_policy,
            )
            cursor = missed[-1]
        late = list(slots.between(max(cursor, now - self.grace), now))
        if late:  # slots due within the grace period still fire, late
            self._record(row.id, [(s, "enqueue") for s in late], next_fire_at=slots.next_after(now))
            cursor = late[-1]
        self._schedule_next(row.id, slots, max(cursor, now))

    def _schedule_next(self, schedule_id: int, slots: Slots, after: datetime) -> None:
        nxt = slots.next_after(after)
        if self.aps is None:
            return
        if nxt is None:
            self._unplan(schedule_id)
            return
        self.aps.add_job(
            self._fire_job,
            "date",
            run_date=nxt,
            args=[schedule_id, nxt],
            id=str(schedule_id),
            replace_existing=True,
        )

    def _fire_job(self, schedule_id: int, slot: datetime) -> None:
        try:
            # The plan made for this schedule is in memory: no per-fire read of the table
            # (fire() locks the row and skips a schedule paused or removed meanwhile).
            with self._lock:
                stamp, slots = self._known.get(schedule_id), self._slots.get(schedule_id)
            if slots is None:
                return
            self._record(schedule_id, [(slot, "enqueue")], next_fire_at=slots.next_after(slot))
            with self._lock:
                if self._known.get(schedule_id) == stamp:
                    self._schedule_next(schedule_id, slots, slot)
        except Exception as exc:  # a failing fire must not kill the scheduler thread
            log.error(
                "schedule.fire_failed",
                schedule_id=schedule_id,
                slot=slot.isoformat(),
                error=f"{type(exc).__name__}: {exc}",
            )

    def _record(
        self, schedule_id: int, planned: list[tuple[datetime, str]], *, next_fire_at: Any
    ) -> None:
        fired = sched.fire_once_each(
            self.engine,
            schedule_id,
            planned,
            now=self.clock(),
            next_fire_at=next_fire_at,
            catalog=self.catalog,
        )
        dispatches = [f.dispatch for f in fired if f.dispatch is not None]
        for f in fired:
            log.info(
                "schedule.fired",
                schedule_id=schedule_id,
                slot=f.slot.isoformat(),
                outcome=f.outcome,
                run_id=str(f.run_id) if f.run_id else None,
            )
        if dispatches:
            try:
                self.publisher.publish(dispatches)
            except BrokerUnavailable as exc:
                log.warning("schedule.publish_deferred", count=len(dispatches), reason=str(exc))


def _take(items: Any, limit: int) -> list[Any]:
    """The last `limit` items (a long outage records its most recent misses)."""
    return list(deque(items, maxlen=limit))
