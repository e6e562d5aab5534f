"""Why a new run may wait: no live worker consumes its queue, or no worker has served its task
lately. Producers say so (a warning on the CLI, `warnings` in the API's answer) instead of
leaving a run pending in silence."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Engine, Table, select

from domain.db.models import Worker
from domain.runs.views import RunView
from domain.schedules.definitions import HELD
from domain.tasks.catalog import TaskTableCatalog

workers = cast(Table, Worker.__table__)

#: A worker heartbeats every 5 s; one silent for three beats is taken for lost.
WORKER_SILENT_AFTER = timedelta(seconds=15)


def live_queues(engine: Engine, now: datetime) -> set[str]:
    """The queues consumed by workers that heartbeat and have not stopped."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(workers.c.queues).where(
                workers.c.stopped.is_(False), workers.c.heartbeat_at >= now - WORKER_SILENT_AFTER
            )
        ).scalars()
        return {q for value in rows for q in (value or {}).get("names", [])}


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


class DeliveryCheck:
    """Warnings for runs just enqueued; the workers' queues are read at most every `ttl_s`."""

    def __init__(
        self,
        engine: Engine,
        tasks: TaskTableCatalog | None = None,
        *,
        ttl_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.tasks = tasks if tasks is not None else TaskTableCatalog(engine)
        self.ttl_s = ttl_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._queues: set[str] = set()
        self._read_at = float("-inf")

    def queues(self, now: datetime) -> set[str]:
        with self._lock:
            if self._monotonic() - self._read_at > self.ttl_s:
                self._queues = live_queues(self.engine, now)
                self._read_at = self._monotonic()
            return self._queues

    def warnings(self, run: RunView, now: datetime) -> list[str]:
        """What may keep `run` from starting soon, one sentence each (none: nothing known)."""
        found: list[str] = []
        if run.kind == "task":
            entry = self.tasks.find(run.name)
            if entry is None:
                found.append(
                    f"no worker has published task {run.name!r}: the run waits for a worker "
                    "whose CONVEYOR_TASK_MODULES has it"
                )
            elif entry.stale(now):
                found.append(
                    f"no worker has served task {run.name!r} for {_ago(now - entry.last_seen_at)}"
                    f" (last: {entry.registered_by or 'unknown'})"
                )
        if run.queue not in self.queues(now):
            found.append(
                f"no live worker consumes queue {run.queue!r}: the run waits until one does "
                f"(conveyor worker -Q {run.queue})"
            )
        return found

    def pending_reason(self, run: RunView, now: datetime) -> str:
        """For a run still pending after a wait: whether anything could have started it."""
        self._read_at = float("-inf")  # fresh: the caller waited
        if run.not_before >= HELD:
            return "it is held until the run it waits for ends (after=, or overlap policy queue)"
        if run.not_before > now:
            return f"it is not due until {run.not_before.isoformat()}"
        problems = self.warnings(run, now)
        if problems:
            return "; ".join(problems)
        return f"workers consume queue {run.queue!r} but none has claimed it yet (all busy?)"
