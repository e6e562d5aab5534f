"""In a worker's main process: say so, loudly, while no scheduler leads.

Workers need a leading `conveyor scheduler` for more than schedules: its relay publishes
retries, delayed runs and chained runs, and its reaper recovers the runs of a worker that
died. Without one all of that waits, silently. This thread reads the leader's heartbeat
(domain/schedules/leader.py) and logs `worker.no_scheduler` once a minute while none is seen.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from domain.clock import Clock, utc_now
from domain.schedules.leader import absence
from domain.settings import Settings

log = structlog.get_logger("conveyor.worker")

WARN_EVERY_S = 60.0


class SchedulerWatch:
    """`check()` looks once (and warns when a warning is due); `start()` checks in a thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        silence_s: float,
        clock: Clock = utc_now,
        warn_every_s: float = WARN_EVERY_S,
    ) -> None:
        self.engine = engine
        self.silence_s = silence_s
        self.clock = clock
        self.warn_every_s = warn_every_s
        self.started = clock()
        self._warned_at: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> str | None:
        """What is wrong while no scheduler leads, else None."""
        now = self.clock()
        try:
            problem = absence(self.engine, now=now, since=self.started, silence_s=self.silence_s)
        except SQLAlchemyError:
            return None  # the database is away: the worker says so where it needs it
        if problem is None:
            if self._warned_at is not None:
                log.info("worker.scheduler_back")
                self._warned_at = None
            return None
        due = (
            self._warned_at is None or (now - self._warned_at).total_seconds() >= self.warn_every_s
        )
        if due:
            log.warning("worker.no_scheduler", problem=problem)
            self._warned_at = now
        return problem

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="conveyor-leader-watch", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        every = min(10.0, self.silence_s / 3)
        while not self._stop.wait(every):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def watch_for_scheduler(app: Any, settings: Settings) -> None:
    """Run a SchedulerWatch in the worker's main process (once per worker, whatever its pool):
    started when Celery says the worker is ready, stopped when it shuts down."""
    from celery.signals import worker_ready, worker_shutdown

    from domain.db.engine import create_db_engine

    watches: list[SchedulerWatch] = []

    def ours(sender: Any) -> bool:  # signals are process-wide; a test process makes many apps
        return getattr(sender, "app", app) is app

    @worker_ready.connect(weak=False)
    def _start(sender: Any = None, **_: Any) -> None:
        if not ours(sender):
            return
        # No pool: nothing is held open in the process the pool's children are forked from.
        engine = create_db_engine(settings.effective_database_url, null_pool=True)
        watch = SchedulerWatch(engine, silence_s=settings.no_scheduler_after_s)
        watch.start()
        watches.append(watch)

    @worker_shutdown.connect(weak=False)
    def _stop(sender: Any = None, **_: Any) -> None:
        if not ours(sender):
            return
        while watches:
            watch = watches.pop()
            watch.stop()
            watch.engine.dispose()
