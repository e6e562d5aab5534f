"""One thread per worker process that watches its running runs: leases, cancels, deadlines."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from domain.clock import Clock, utc_now
from domain.runs import store as runstore
from worker.context import TaskContext

log = structlog.get_logger("conveyor.monitor")


@dataclass
class Watched:
    ctx: TaskContext
    timeout_at: float | None  # monotonic
    minutes_at: float | None  # monotonic (max_minutes, counted from the run's first start)
    give_up_at: float | None = None


class RunMonitor:
    """Heartbeats every watched run in one UPDATE per tick and asks a run to stop when it is
    cancelled, times out, runs past max_minutes or lost its lease. A run that ignores the stop
    for `kill_grace_s` is handed to `on_abandon` (which records it and may end the process)."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_s: float,
        tick_s: float,
        kill_grace_s: float,
        on_abandon: Callable[[TaskContext], None],
        clock: Clock = utc_now,
    ) -> None:
        self.engine = engine
        self.lease_s = lease_s
        self.tick_s = tick_s
        self.kill_grace_s = kill_grace_s
        self.on_abandon = on_abandon
        self.clock = clock
        self._watched: dict[uuid.UUID, Watched] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(
        self, ctx: TaskContext, *, timeout_s: float | None, max_minutes: float | None
    ) -> None:
        self._ensure_thread()
        now_m = time.monotonic()
        minutes_at = None
        if max_minutes is not None:
            elapsed = (self.clock() - ctx._claim.started_at).total_seconds()
            minutes_at = now_m + max_minutes * 60 - elapsed
        timeout_at = now_m + timeout_s if timeout_s else None
        with self._lock:
            self._watched[ctx.run_id] = Watched(ctx, timeout_at, minutes_at)
        if (timeout_at and timeout_at < now_m + self.tick_s) or (
            minutes_at and minutes_at <= now_m
        ):
            self._wake.set()

    def unwatch(self, run_id: uuid.UUID) -> None:
        with self._lock:
            self._watched.pop(run_id, None)

    @property
    def running(self) -> int:
        return len(self._watched)

    def close(self) -> None:
        self._stopped.set()
        self._wake.set()

    def _ensure_thread(self) -> None:
        # After a fork the thread object is there but the thread is not: start one per process.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="conveyor-monitor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_beat = time.monotonic() + self.tick_s
        while not self._stopped.is_set():
            timeout = max(0.0, min(next_beat, self._next_deadline()) - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()
            now_m = time.monotonic()
            if now_m >= next_beat:
                self._beat()
                next_beat = now_m + self.tick_s
            self._check_deadlines(time.monotonic())

    def _next_deadline(self) -> float:
        with self._lock:
            times = [
                t
                for w in self._watched.values()
                for t in (w.timeout_at, w.minutes_at, w.give_up_at)
                if t is not None
            ]
        return min(times, default=float("inf"))

    def _beat(self) -> None:
        with self._lock:
            watched = list(self._watched.values())
        if not watched:
            return
        owned = [(w.ctx.run_id, w.ctx.attempt) for w in watched]
        try:
            with self.engine.begin() as conn:
                alive = runstore.heartbeat_many(conn, owned, now=self.clock(), lease_s=self.lease_s)
        except DBAPIError as exc:
            # The lease outlives a few missed beats; if the database stays away, it expires and
            # the reaper hands the run to another worker, which is the safe outcome.
            log.warning("monitor.heartbeat_failed", runs=len(owned), reason=str(exc.orig))
            return
        for w in watched:
            if w.ctx.run_id not in alive:
                w.ctx.stop("lease_lost", "another attempt owns this run now")
            elif alive[w.ctx.run_id]:
                w.ctx.stop("cancelled", "cancel requested")

    def _check_deadlines(self, now_m: float) -> None:
        abandon = []
        with self._lock:
            for w in self._watched.values():
                if w.timeout_at is not None and now_m >= w.timeout_at:
                    w.ctx.stop("timed_out", "the run took longer than its timeout")
                    w.timeout_at = None  # spent: a past deadline would make the loop spin
                if w.minutes_at is not None and now_m >= w.minutes_at:
                    w.ctx.stop("budget_exceeded", "max_minutes exceeded")
                    w.minutes_at = None
                if w.ctx.cancelled and w.give_up_at is None:
                    w.give_up_at = now_m + self.kill_grace_s
                if w.give_up_at is not None and now_m >= w.give_up_at:
                    abandon.append(w)
            for w in abandon:
                self._watched.pop(w.ctx.run_id, None)
        for w in abandon:
            try:
                self.on_abandon(w.ctx)
            except Exception:
                log.exception("monitor.abandon_failed", run_id=str(w.ctx.run_id))
