"""Fires schedules while this process leads: one APScheduler job per distinct fire instant,
which records every schedule due at that instant together (domain/schedules/fires.py), on
PostgreSQL written ahead of the instant and committed at it; missed slots follow the misfire
policy."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from domain.clock import Clock, utc_now
from domain.db.capabilities import capabilities
from domain.db.unit_of_work import UnitOfWork
from domain.errors import BrokerUnavailable, ConveyorError
from domain.ports import Catalog, Publisher, send_later
from domain.runs.recovery import hand_back
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.schedules.fires import (
    Due,
    Fired,
    RequestCache,
    advance_cursors,
    fire_many,
    plan_missed,
)
from scheduler.triggers import Slots, TriggerSpec

log = structlog.get_logger("conveyor.scheduler")

#: On PostgreSQL an instant's transaction starts this long before it and commits at it
#: (fire_many's `before_commit`): what is left at the slot is the commit and sending the
#: messages, built before it.
#: Half a second leaves room for a thousand fires on a busy machine (bench/scheduler.py).
STAGE_S = 0.5
#: A job this late is not late yet, whatever the misfire grace (0 included): APScheduler's own
#: wake-up, and a job waiting for the one before it, take that long on a busy machine.
JOB_SLACK = timedelta(seconds=1)


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
    edits (called about once a second), `stop()` ends all jobs (leadership lost).

    The plan lives in memory: for each schedule its fire times and the instant it waits for,
    and for each instant the schedules waiting for it. A thousand schedules on one-second
    intervals are one APScheduler job a second, one transaction and one broker publish, not a
    thousand of each.
    """

    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        *,
        catalog: Catalog | None = None,
        clock: Clock = utc_now,
        misfire_grace_s: float = 60.0,
        stage_s: float | None = None,
        on_replan: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.catalog = catalog
        self.clock = clock
        self.grace = timedelta(seconds=misfire_grace_s)
        if stage_s is None:  # SQLite has one writer: a transaction held open would stall it
            stage_s = STAGE_S if capabilities(engine).concurrent_writers else 0.0
        self.stage = timedelta(seconds=stage_s)
        self.aps: BackgroundScheduler | None = None
        self._known: dict[int, Any] = {}  # schedule id -> updated_at we planned with
        self._slots: dict[int, Slots] = {}  # schedule id -> its fire times, as planned
        self._waiting: dict[int, datetime] = {}  # schedule id -> the instant it fires next
        self._then: dict[int, datetime | None] = {}  # schedule id -> its slot after that one
        self._due: dict[datetime, set[int]] = {}  # instant -> schedules firing then
        self._requests = RequestCache()
        self._stale: set[int] = set()  # a fire failed: re-plan from the database's cursor
        self._marker: Any = None
        self._lock = threading.Lock()
        #: Called when schedules wait to be re-planned, so that the next sync comes at once
        #: (the service's own poll is 30 s apart while it listens for edits).
        self._on_replan = on_replan

    def start(self) -> None:
        # One thread: instants fire one at a time, in order. A schedule's next slot is then
        # never recorded while its previous one is still in flight (were that one to fail
        # after the next had moved the cursor on, its slot would be a silent gap), and a job
        # added for an instant already being fired waits behind it instead of beside it.
        # Lateness is ours to judge (`_fire_instant`), so APScheduler runs every job however
        # late it comes.
        aps = BackgroundScheduler(
            timezone="UTC",
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"misfire_grace_time": None, "coalesce": False},
        )
        aps.start()
        self.aps = aps
        with self._lock:
            self._known.clear()
            self._waiting.clear()
            self._then.clear()
            self._due.clear()
            self._stale.clear()
        self._marker = None
        self.sync()

    def stop(self) -> None:
        # APScheduler 3's shutdown(wait=True) joins the running jobs while holding the lock that
        # add_job needs, and a job plans its next instant with add_job (under our lock): once
        # `aps` is taken away under our lock, no job is inside add_job and none will call it.
        with self._lock:
            aps, self.aps = self.aps, None
        if aps is not None:
            aps.shutdown(wait=True)

    def sync(self, *, force: bool = False) -> None:
        """Re-plan schedules that were added, edited, paused, resumed or removed, and those
        whose last fire failed; slots they missed are recorded in one batch. Unless `force`
        (a change was announced), an unchanged table is seen from one cheap query."""
        marker = sched.changes_marker(self.engine)
        with self._lock:
            stale = set(self._stale)
        if marker == self._marker and not stale and not force:
            return
        rows = {s.id: s for s in manage.list_schedules(UnitOfWork(self.engine))}
        dues: list[Due] = []
        with self._lock:
            self._stale -= stale
            for schedule_id in list(self._known):
                row = rows.get(schedule_id)
                if row is None or not row.enabled:
                    self._unplan(schedule_id)
            for row in rows.values():
                if row.enabled and (self._known.get(row.id) != row.updated_at or row.id in stale):
                    dues.extend(self._plan(row))
        self._marker = marker
        self._fire(dues)

    def planned(self) -> dict[int, datetime]:
        """Each planned schedule's next instant (a copy)."""
        with self._lock:
            return dict(self._waiting)

    def replan(self, schedule_ids: list[int]) -> None:
        """Plan these schedules again from the database's cursor, at the next sync."""
        with self._lock:
            self._replan_later(schedule_ids)

    def _unplan(self, schedule_id: int) -> None:
        self._known.pop(schedule_id, None)
        self._slots.pop(schedule_id, None)
        self._unplan_slot(schedule_id)

    def _unplan_slot(self, schedule_id: int) -> None:
        self._then.pop(schedule_id, None)
        instant = self._waiting.pop(schedule_id, None)
        if instant is not None:
            self._due.get(instant, set()).discard(schedule_id)

    def _plan(self, row: Any) -> list[Due]:
        """Plan the schedule's next slot; return what it missed (and must record) till now."""
        self._unplan(row.id)
        try:
            slots = slots_for(row)
        except ConveyorError as exc:  # stored before a rule changed: report, do not crash
            log.error("schedule.invalid", schedule=row.name, reason=str(exc))
            return []
        self._known[row.id] = row.updated_at
        self._slots[row.id] = slots
        now = self.clock()
        cursor = row.last_fire_at or row.created_at
        dues = []
        missed = list(_take(slots.between(cursor, now - self.grace), sched.MAX_RECORDED_MISSES))
        if missed:
            planned = plan_missed(missed, row.misfire_policy, row.catch_up_limit)
            log.info(
                "schedule.misfired",
                schedule=row.name,
                missed=len(missed),
                policy=row.misfire_policy,
            )
            cursor = missed[-1]
        else:
            planned = []
        # slots due within the grace period still fire, late
        planned += [(s, "enqueue") for s in slots.between(max(cursor, now - self.grace), now)]
        if planned:
            dues.append(Due(row.id, planned, slots.next_after(max(planned[-1][0], now))))
            cursor = planned[-1][0]
        self._wait(row.id, slots.next_after(max(cursor, now)))
        return dues

    def _wait(self, schedule_id: int, instant: datetime | None) -> None:
        """Put the schedule in the set for `instant`; an instant not in `_due` gets a job.
        Called with `_lock` held.

        An instant stays in `_due` from its job's creation until that job takes the set, so
        a schedule planned onto an instant whose job has started (its transaction staged, in
        the half second before the slot) gets a job of its own, fired right after. Jobs are
        never named after their instant: APScheduler 3.11 counts running instances per job
        id and drops a date job that is due while one of the same id runs, which left such a
        schedule waiting for an instant that had already passed.
        """
        if instant is None:  # no more slots (a `once` that fired, an end date passed)
            return
        self._waiting[schedule_id] = instant
        waiting = self._due.get(instant)
        if waiting is None:
            waiting = self._due[instant] = set()
            if self.aps is not None:
                self.aps.add_job(
                    self._fire_instant, "date", run_date=instant - self.stage, args=[instant]
                )
        waiting.add(schedule_id)

    def _fire_instant(self, instant: datetime) -> None:
        """The APScheduler job, run `stage` before `instant`: fire every schedule waiting for
        `instant` (committed at it), each moving on to its next slot. That slot was computed
        after the previous fire (a thousand trigger look-ups take milliseconds, which would
        otherwise delay this instant); the one after it once this instant is published.

        An instant whose job comes later than the misfire grace (the process was frozen, or
        the database slow) is not fired as if on time: its schedules are re-planned from the
        database's cursor, so the slots they missed follow their misfire policy."""
        dues: list[Due] = []
        with self._lock:
            if self.aps is None:
                return  # leadership ended while this job waited for the thread
            # those re-planned meanwhile wait for another instant
            waiting = [
                s for s in sorted(self._due.pop(instant, ())) if self._waiting.get(s) == instant
            ]
            late = self.clock() - instant
            if late > max(self.grace, JOB_SLACK) and waiting:
                self._replan_later(waiting)
                log.warning(
                    "schedule.overdue",
                    slot=instant.isoformat(),
                    schedules=len(waiting),
                    late_s=round(late.total_seconds(), 3),
                    action="replan",
                )
                return
            for schedule_id in waiting:
                if schedule_id in self._then:
                    nxt = self._then.pop(schedule_id)
                else:
                    nxt = self._slots[schedule_id].next_after(instant)
                del self._waiting[schedule_id]
                self._wait(schedule_id, nxt)
                dues.append(Due(schedule_id, [(instant, "enqueue")], nxt))
        self._fire(dues, instant)
        self._look_ahead(dues)

    def _look_ahead(self, dues: list[Due]) -> None:
        with self._lock:
            for due in dues:
                nxt = due.next_fire_at
                if nxt is not None and self._waiting.get(due.schedule_id) == nxt:
                    self._then[due.schedule_id] = self._slots[due.schedule_id].next_after(nxt)

    def _fire(self, dues: list[Due], instant: datetime | None = None) -> None:
        """Record and publish `dues` (committed at `instant` when given). If that fails, the
        schedules are left to the next sync."""
        try:
            self._record(dues, instant)
        except Exception as exc:  # a failing fire must not kill the scheduler thread
            log.error(
                "schedule.fire_failed",
                slot=max(s for due in dues for s, _ in due.planned).isoformat(),
                schedules=len(dues),
                error=f"{type(exc).__name__}: {exc}",
            )
            self._retry_later(dues)

    def _retry_later(self, dues: list[Due]) -> None:
        """Slots that could not be recorded: those schedules wait for the next sync, which
        re-plans them from the database's cursor (late slots fire, older ones are misfires),
        rather than fire their next slot and leave a silent gap behind."""
        with self._lock:
            self._replan_later(
                [d.schedule_id for d in dues if self._waiting.get(d.schedule_id) == d.next_fire_at]
            )  # the others were re-planned meanwhile

    def _replan_later(self, schedule_ids: list[int]) -> None:
        """Forget these schedules' next instant; the next sync plans them again from the
        database's cursor. Called with `_lock` held."""
        for schedule_id in schedule_ids:
            self._unplan_slot(schedule_id)
            self._stale.add(schedule_id)
        if schedule_ids and self._on_replan is not None:
            self._on_replan()

    def _record(self, dues: list[Due], instant: datetime | None = None) -> None:
        if not dues:
            return
        now = self.clock()
        sends: list[Callable[[], None]] = []
        stage: Callable[[list[Fired]], None] | None = None
        if instant is not None and self.stage and instant > now:
            now = instant  # the runs are created, and visible, at their slot

            def stage(staged: list[Fired]) -> None:
                sends.append(self._prepare(staged, instant))  # built before the slot
                self._sleep_until(instant)

        fired = fire_many(
            self.engine,
            dues,
            now=now,
            catalog=self.catalog,
            requests=self._requests,
            before_commit=stage,
        )
        if sends:
            sends[0]()
        else:
            self._prepare(fired, now)()
        deferred = {f.schedule_id for f in fired if f.outcome == "deferred"}
        if deferred:  # overlap skip/queue: decided on what is active now that the slot came
            now = self.clock()
            later = fire_many(
                self.engine,
                [d for d in dues if d.schedule_id in deferred],
                now=now,
                catalog=self.catalog,
                requests=self._requests,
            )
            self._prepare(later, now)()
            fired = [f for f in fired if f.outcome != "deferred"] + later
        advance_cursors(self.engine, dues, fired)  # after the publish: off the runs' path
        _log_fired(fired)

    def _prepare(self, fired: list[Fired], now: datetime) -> Callable[[], None]:
        """Build the messages for `fired` (runs made at `now`); the returned function sends
        them. Publishing is best effort: the runs are committed, and what is not sent goes
        back to the relay, which publishes it as soon as it reaches the broker."""
        dispatches = [f.dispatch for f in fired if f.dispatch is not None]
        if not dispatches:
            return lambda: None
        try:
            send = send_later(self.publisher, dispatches)
        except BrokerUnavailable:  # could not even build them: try again after the commit
            send = partial(self.publisher.publish, dispatches)

        def deliver() -> None:
            try:
                send()
            except BrokerUnavailable as exc:
                log.warning("schedule.publish_deferred", count=len(dispatches), reason=str(exc))
                hand_back(self.engine, [d.run_id for d in dispatches], marked_at=now)

        return deliver

    def _sleep_until(self, instant: datetime) -> None:
        delay = (instant - self.clock()).total_seconds()
        if delay > 0:
            time.sleep(delay)


def _log_fired(fired: list[Fired]) -> None:
    """One event per batch (a line per fire would cost more than the fire at 1,000/s), and
    one per slot that failed, with its reason."""
    for f in fired:
        if f.outcome == "failed":
            log.error(
                "schedule.fire_failed",
                schedule_id=f.schedule_id,
                slot=f.slot.isoformat(),
                error=f.error,
            )
    if not fired:
        return
    outcomes = Counter(f.outcome for f in fired)
    slots = sorted({f.slot for f in fired})
    log.info(
        "schedule.fired",
        slot=slots[-1].isoformat(),
        slots=len(slots),
        schedules=len({f.schedule_id for f in fired}),
        **outcomes,
    )


def _take(items: Any, limit: int) -> list[Any]:
    """The last `limit` items (a long outage records its most recent misses)."""
    return list(deque(items, maxlen=limit))
