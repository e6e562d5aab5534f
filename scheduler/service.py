"""The scheduler process: as leader, runs the relay and reaper sweeps; otherwise stands by."""

from __future__ import annotations

import threading
import time

import structlog
from sqlalchemy import Engine

from domain.clock import Clock, utc_now
from domain.db.capabilities import capabilities
from domain.gc_pause import freeze_startup_heap
from domain.housekeeping.retention import apply_retention, make_coming_days
from domain.housekeeping.rollups import roll_up
from domain.pipelines.discovery import pipeline_directory_for
from domain.ports import Catalog, Publisher
from domain.runs.chains import release_after
from domain.runs.dispatch import next_due
from domain.runs.gathering import wake_gatherers
from domain.runs.recovery import forget_dead_workers, reap_once, relay_once
from domain.schedules.definitions import release_held
from domain.schedules.leader import beat, beat_every
from domain.settings import Settings
from domain.tasks.registry import Registry
from scheduler.changes import ChangeListener
from scheduler.declared import sync_code_schedules, sync_pipeline_schedules
from scheduler.deliveries import OutboundSweeper
from scheduler.leader import Leadership, leadership_for
from scheduler.schedule_runner import ScheduleRunner
from scheduler.watchdog import WATCH_EVERY_S, ScheduleWatchdog

log = structlog.get_logger("conveyor.scheduler")

STANDBY_RETRY_S = 1.0
#: With LISTEN in place (PostgreSQL) edits arrive as notifications; this poll is only the net
#: for one lost while the listener reconnected. Without it the schedules are polled each check.
POLL_WHILE_LISTENING_S = 30.0
#: How long one retention or rollup pass may hold the leader's loop (retention's rests
#: included): it stops starting transactions then, and the loop's next pass, after the
#: relay's, goes on. A first start over a year of history is many such slices.
HOUSEKEEPING_SLICE_S = 2.0


class SchedulerService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        publisher: Publisher,
        *,
        leadership: Leadership | None = None,
        clock: Clock = utc_now,
        catalog: Catalog | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.publisher = publisher
        self.leadership = leadership or leadership_for(engine, settings.home)
        self.clock = clock
        self.stop_event = threading.Event()
        self._wake = threading.Event()  # stop, or a schedule changed: look now
        self._changed = threading.Event()
        self.listener: ChangeListener | None = None  # PostgreSQL, while leading
        self.is_leader = False
        self.registry = registry
        self.schedules = ScheduleRunner(
            engine,
            publisher,
            catalog=catalog,
            clock=clock,
            misfire_grace_s=settings.schedule_misfire_grace_s,
            on_replan=self._schedule_changed,
        )
        self.watchdog = ScheduleWatchdog(engine, self.schedules, clock=clock)
        self.outbound = OutboundSweeper(engine, settings, clock=clock)

    def run(self) -> None:
        """Block until stop(): wait for leadership, then sweep; give it up if the lock is lost."""
        # Modules, the Celery app, the registry: walked by every full collection a thousand
        # fires' allocations trigger, about a fifth of the CPU at 1,000 fires a second.
        freeze_startup_heap()
        log.info("scheduler.started", standby=True)
        try:
            while not self.stop_event.is_set():
                if not self.leadership.try_acquire():
                    self.stop_event.wait(STANDBY_RETRY_S)
                    continue
                self.is_leader = True
                log.info("scheduler.leader")
                try:
                    if self.registry is not None:
                        sync_code_schedules(self.engine, self.registry, clock=self.clock)
                    sync_pipeline_schedules(
                        self.engine, pipeline_directory_for(self.settings), clock=self.clock
                    )
                    self.schedules.start()
                    self._lead()
                finally:
                    self.schedules.stop()
                    self.is_leader = False
        finally:
            self.leadership.release()
            log.info("scheduler.stopped")

    def _lead(self) -> None:
        if capabilities(self.engine).notify:
            self.listener = ChangeListener(self.engine, self._schedule_changed)
            self.listener.start()
        try:
            self._sweep()
        finally:
            if self.listener is not None:
                self.listener.stop()
                self.listener = None

    def _schedule_changed(self) -> None:
        self._changed.set()
        self._wake.set()

    def _poll_every(self) -> float:
        listening = self.listener is not None and self.listener.listening.is_set()
        return POLL_WHILE_LISTENING_S if listening else STANDBY_RETRY_S

    def _sweep(self) -> None:
        next_relay = next_reap = next_housekeeping = next_retention = next_beat = 0.0
        next_check = time.monotonic() + STANDBY_RETRY_S
        last_sync = time.monotonic()  # start() has just synced
        next_watch = last_sync + WATCH_EVERY_S
        while not self.stop_event.is_set():
            now_m = time.monotonic()
            if now_m >= next_check:
                if not self.leadership.still_held():
                    log.warning("scheduler.leadership_lost")
                    return
                next_check = now_m + STANDBY_RETRY_S
            notified = self._changed.is_set()
            if notified or now_m >= last_sync + self._poll_every():
                self._changed.clear()
                last_sync = now_m
                try:
                    self.schedules.sync(force=notified)  # at once, or within a second
                except Exception as exc:
                    log.error("scheduler.sync_failed", error=f"{type(exc).__name__}: {exc}")
            if now_m >= next_watch:
                next_watch = now_m + WATCH_EVERY_S
                try:
                    self.watchdog.check()  # a schedule behind the clock is re-planned
                except Exception as exc:  # the database is away: the next check tries again
                    log.error("scheduler.watch_failed", error=f"{type(exc).__name__}: {exc}")
            try:
                if now_m >= next_beat:  # workers and /readyz tell from it that someone leads
                    beat(self.engine, now=self.clock())
                    next_beat = now_m + beat_every(self.settings.no_scheduler_after_s)
                self.outbound.tick()  # callbacks and notifications: a pass a second, off-loop
                if now_m >= next_reap:
                    reap_once(self.engine, clock=self.clock)
                    forget_dead_workers(self.engine, clock=self.clock)
                    next_reap = now_m + self.settings.reaper_interval_s
                if now_m >= next_housekeeping:
                    next_housekeeping = now_m + self._roll_up()
                if now_m >= next_retention:
                    next_retention = now_m + self._retain()
                if now_m >= next_relay:
                    next_relay = time.monotonic() + self._relay()
            except Exception as exc:  # a sweep failing must not end the process
                log.error("scheduler.sweep_failed", error=f"{type(exc).__name__}: {exc}")
                self.stop_event.wait(STANDBY_RETRY_S)
            self._wake.wait(max(0.0, min(next_relay, next_reap, next_check) - time.monotonic()))
            self._wake.clear()

    def _roll_up(self) -> float:
        """A slice of the rollups; the seconds until the next (none while a backlog is left)."""
        until = time.perf_counter() + HOUSEKEEPING_SLICE_S
        rolled = roll_up(self.engine, now=self.clock(), until=until)
        return self.settings.rollup_interval_s if rolled.caught_up else 0.0

    def _retain(self) -> float:
        """A slice of retention; the seconds until the next (none while a backlog is left).
        A year of history on first start must not hold the relay and the reaper for minutes."""
        make_coming_days(self.engine, now=self.clock())
        until = time.perf_counter() + HOUSEKEEPING_SLICE_S
        apply_retention(
            self.engine,
            now=self.clock(),
            default_days=self.settings.retention_days,
            rules=self.settings.retention_rules,
            archive_dir=self.settings.archive_dir,
            until=until,
        )
        more = time.perf_counter() >= until  # the slice used up: more is left
        return 0.0 if more else self.settings.retention_interval_s

    def _relay(self) -> float:
        """Release held and chained runs, wake gatherers whose children ended, publish what is
        due; the seconds until the next sweep: the relay interval, or less when a run falls due
        before then (a sleep ending, a delay), so it is sent at its time."""
        release_held(self.engine, now=self.clock())
        release_after(self.engine, now=self.clock())
        wake_gatherers(self.engine, now=self.clock())
        relay_once(
            self.engine,
            self.publisher,
            clock=self.clock,
            grace_s=self.settings.dispatch_grace_s,
            in_flight=self.settings.dispatch_in_flight,
        )
        every = self.settings.relay_interval_s
        due = next_due(self.engine, now=self.clock(), within_s=every)
        if due is None:
            return every
        return min(every, max(0.0, (due - self.clock()).total_seconds()))

    def stop(self) -> None:
        self.stop_event.set()
        self._wake.set()
