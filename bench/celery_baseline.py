"""The Celery baselines: `celery -A bench.celery_baseline worker|beat`, no conveyor code at all.

One module, configured from the environment the benchmark sets (bench.common.celery_env):
BENCH_CELERY_BACKEND empty is bare Celery on Redis (no result backend); a
`db+postgresql+psycopg://...` URL is Celery's own SQLAlchemy result backend.
BENCH_CELERY_QUEUE names the queue; BENCH_BEAT_ENTRIES (K) and BENCH_BEAT_LOG configure beat.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery
from celery.beat import PersistentScheduler

#: Bare Celery's completion signal: each task INCRs it (one Redis round trip, left in the time).
DONE_KEY = "bench:celery:done"
#: bench.stamp pushes "start - sent" (seconds) here.
LATENCY_KEY = "bench:celery:latency"


def make_app(broker: str, backend: str = "", queue: str = "bench") -> Celery:
    """Celery as people configure it: JSON, and a result backend only when one is named."""
    app = Celery("bench", broker=broker, backend=backend or None, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=not backend,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    counts = not backend  # with a backend, the stored result is the completion signal
    client: list[redis.Redis] = []

    def r() -> redis.Redis:
        if not client:  # made in the process that uses it (a prefork child), kept for its life
            client.append(redis.Redis.from_url(broker))
        return client[0]

    @app.task(name="bench.noop", shared=False)
    def noop(i: int) -> None:
        if counts:
            r().incr(DONE_KEY)

    @app.task(name="bench.stamp", shared=False)
    def stamp(sent: float) -> None:
        r().rpush(LATENCY_KEY, time.time() - sent)

    return app


class MeasuringScheduler(PersistentScheduler):
    """Beat's default scheduler, noting for every entry it applies: when it was due (the
    previous run + the interval, beat's own rule), when beat decided to send it, and when the
    send returned. Written to BENCH_BEAT_LOG as `name due decided sent` lines, in batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._notes: list[str] = []
        self._path = os.environ.get("BENCH_BEAT_LOG", "")
        super().__init__(*args, **kwargs)

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        decided = time.time()
        super().apply_entry(entry, producer=producer)
        sent = time.time()
        run_every = getattr(entry.schedule, "run_every", None)
        if run_every is not None and self._path:
            due = (entry.last_run_at + run_every).timestamp()
            self._notes.append(f"{entry.name} {due:.6f} {decided:.6f} {sent:.6f}\n")
            if len(self._notes) >= 2000:
                self._write_notes()

    def _write_notes(self) -> None:
        if self._notes and self._path:
            with open(self._path, "a") as f:
                f.writelines(self._notes)
            self._notes.clear()

    def close(self) -> None:
        self._write_notes()
        super().close()


def _beat_schedule(count: int) -> dict[str, dict[str, Any]]:
    return {
        f"bench-{k}": {"task": "bench.noop", "schedule": 1.0, "args": (k,)} for k in range(count)
    }


# The Celery worker of a baseline is started with BENCH_BROKER set (bench/common.celery_env); a
# benchmark that only imports this module (for DONE_KEY, make_app) connects nowhere.
app = make_app(
    os.environ.get("BENCH_BROKER", "memory://"),
    os.environ.get("BENCH_CELERY_BACKEND", ""),
    os.environ.get("BENCH_CELERY_QUEUE", "bench"),
)
app.conf.beat_schedule = _beat_schedule(int(os.environ.get("BENCH_BEAT_ENTRIES", "0")))
