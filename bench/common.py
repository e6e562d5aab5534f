"""Shared setup for benchmarks: a fresh PostgreSQL database and a Redis server of their own,
timing, and the real worker and scheduler processes the end-to-end benchmarks measure.

A benchmark is a good neighbour: it creates uniquely named databases and drops them when it
exits, and it runs its own `redis-server` on a free port (or the one CONVEYOR_BENCH_BROKER names,
which it then treats as its own: it empties that database between rounds)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from domain.db.migrate import upgrade
from domain.db.models import runs
from tests.services import PrivateRedis

PG_ADMIN = os.environ.get("CONVEYOR_BENCH_PG", "postgresql+psycopg://127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[1]
#: Where the processes a benchmark starts write their output (read it when one fails).
LOG_DIR = Path(tempfile.gettempdir()) / "conveyor-bench"


def fresh_database(name: str = "conveyor_bench", *, migrate: bool = True) -> str:
    """Create a database of this process's own (`name` plus a unique suffix), migrate it (unless
    told not to), return its URL. It is dropped when the benchmark exits."""
    name = f"{name}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    atexit.register(_drop_database, name)
    url = make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    if migrate:
        upgrade(url)
    return url


def _drop_database(name: str) -> None:
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with contextlib.suppress(Exception), admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@functools.cache
def broker_url() -> str:
    """The benchmark's Redis: CONVEYOR_BENCH_BROKER, or a private redis-server started on first
    use and stopped when the benchmark exits."""
    url = os.environ.get("CONVEYOR_BENCH_BROKER")
    if url:
        return url
    server = PrivateRedis()
    server.start()
    atexit.register(server.close)
    return server.url(0)


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy URL (postgresql+psycopg://...) as psycopg itself takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def flush_redis() -> None:
    """Empty the benchmark's own Redis database between rounds."""
    redis.Redis.from_url(broker_url()).flushdb()


class Disturbed(Exception):
    """Someone emptied the benchmark's Redis database mid-measurement; the round is void."""


class RedisGuard:
    """Notices that the benchmark's Redis database was emptied mid-round (possible when
    CONVEYOR_BENCH_BROKER names a shared server): the messages in flight are gone, so the round
    cannot finish and must be measured again."""

    KEY = "bench:sentinel"

    def __init__(self) -> None:
        self.redis = redis.Redis.from_url(broker_url())

    def arm(self) -> None:
        self.redis.set(self.KEY, 1)

    def check(self) -> None:
        if not self.redis.exists(self.KEY):
            raise Disturbed("the benchmark's Redis database was emptied by another process")


@dataclass
class Result:
    label: str
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def timed(label: str, count: int, fn: Callable[[], None], repeat: int = 3) -> Result:
    """Best of `repeat` runs (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return Result(label, count, min(times))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))
    return ordered[index]


def report(results: list[Result], baseline: Result) -> None:
    width = max(len(r.label) for r in results)
    print(f"{'what':<{width}}  {'runs/s':>10}  {'vs baseline':>11}")
    for r in results:
        print(f"{r.label:<{width}}  {r.rate:>10,.0f}  {r.rate / baseline.rate:>10.2f}x")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        first, *rest = row
        print(
            "  ".join(
                [
                    first.ljust(widths[0]),
                    *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)),
                ]
            )
        )


def wait_for(check: Callable[[], bool], *, timeout: float, every: float = 0.02, what: str) -> float:
    """Poll `check` until it holds; return perf_counter() at that moment. Fails after timeout."""
    deadline = time.perf_counter() + timeout
    while True:
        if check():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout:g}s (process logs: {LOG_DIR})")
        time.sleep(every)


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (a worker's pool children)."""
    proc = psutil.Process(pid)
    return [pid, *(c.pid for c in proc.children(recursive=True))]


def pg_backends(database: str) -> list[int]:
    """PIDs of the PostgreSQL server processes serving connections to `database`."""
    admin = create_engine(PG_ADMIN, poolclass=NullPool)
    with admin.connect() as conn:
        query = text(
            "SELECT pid FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"
        )
        pids = [int(p) for p in conn.execute(query, {"db": database}).scalars()]
    admin.dispose()
    return pids


def settle_database(url: str, *, timeout: float = 60.0) -> None:
    """Let PostgreSQL finish what the last measurement left it: VACUUM and ANALYZE the tables
    (so autovacuum does not start on the 100,000 rows just written in the middle of the next
    measurement, stealing a core) and CHECKPOINT (so the next run does not pay for this one's
    dirty pages). Then wait until no autovacuum worker is busy in the database."""
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    database = make_url(url).database
    try:
        with engine.connect() as conn:
            conn.execute(text("VACUUM (ANALYZE)"))
            conn.execute(text("CHECKPOINT"))
            busy = text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = :db AND backend_type = 'autovacuum worker'"
            )
            wait_for(
                lambda: conn.execute(busy, {"db": database}).scalar_one() == 0,
                timeout=timeout,
                every=0.1,
                what="autovacuum to finish",
            )
    finally:
        engine.dispose()


class CpuMeter:
    """CPU seconds a set of processes used between start() and stop(); the set is read at both
    ends, so a process that appears in between counts from zero."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self._before: dict[int, float] = {}

    def _read(self) -> dict[int, float]:
        out = {}
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
        return out

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> float:
        return sum(after - self._before.get(pid, 0.0) for pid, after in self._read().items())


# -- processes ----------------------------------------------------------------------------------
def conveyor_env(database_url: str, **overrides: str) -> dict[str, str]:
    """Environment for `python -m conveyor ...` on the benchmark database and Redis.

    Logging at WARNING, as the Celery baselines run with `-l WARNING`: neither side pays for a
    log line per task.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        {
            "CONVEYOR_DATABASE_URL": database_url,
            "CONVEYOR_BROKER_URL": broker_url(),
            "CONVEYOR_TASK_MODULES": "bench.tasks",
            "CONVEYOR_LOG_LEVEL": "WARNING",
            "CONVEYOR_LOG_FORMAT": "json",
            "CONVEYOR_SHUTDOWN_GRACE_S": "2",
            "PYTHONPATH": str(ROOT),
            **overrides,
        }
    )
    return env


def celery_env(**values: str) -> dict[str, str]:
    """Environment for the baseline Celery app (bench/celery_baseline.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "BENCH_"))}
    env.update({"BENCH_BROKER": broker_url(), "PYTHONPATH": str(ROOT), **values})
    return env


WORKER_FLAGS = ("-l", "WARNING", "--without-mingle", "--without-gossip")


def conveyor_worker_argv(name: str, concurrency: int) -> list[str]:
    """`conveyor worker` with prefork children (the default pool), as deployed."""
    return ["-m", "conveyor", "worker", "-c", str(concurrency), "-n", f"{name}@%h", *WORKER_FLAGS]


def celery_worker_argv(name: str, concurrency: int, queue: str) -> list[str]:
    """A plain `celery worker` on the baseline app, the same pool and flags as conveyor's."""
    return [
        "-m", "celery", "-A", "bench.celery_baseline", "worker", "-P", "prefork",
        "-c", str(concurrency), "-Q", queue, "-n", f"{name}@%h", *WORKER_FLAGS,
    ]  # fmt: skip


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


class Processes:
    """Processes a benchmark starts (each in its own session), stopped when the block ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        LOG_DIR.mkdir(parents=True, exist_ok=True)

    def start(self, argv: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        with (LOG_DIR / f"{name}.log").open("wb") as log:  # the child keeps its own fd
            proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
        """SIGTERM the process's group (its pool children too), SIGKILL it if it lingers."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        if proc in self.procs:
            self.procs.remove(proc)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}; see {LOG_DIR}")

    def __enter__(self) -> Processes:
        # A benchmark stopped with SIGTERM (`timeout`, a CI limit) still stops what it started.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def in_process_executor(engine: Any, writer: Any, registry: Any, **options: Any) -> Any:
    """The worker's executor in this process, with its monitor (bench/pipelines.py, steps.py):
    the worker's code path without the broker hop. Close it with `close_executor`."""
    from worker.executor import Executor
    from worker.monitor import RunMonitor

    holder: list[Executor] = []
    monitor = RunMonitor(
        engine,
        lease_s=30,
        tick_s=1.0,
        kill_grace_s=5,
        on_abandon=lambda ctx: holder[0].abandon(ctx),  # noqa: PLW0108 - bound later
    )
    executor = Executor(engine, writer, registry, monitor, owner="bench", lease_s=30, **options)
    holder.append(executor)
    return executor


def close_executor(executor: Any) -> None:
    executor.monitor.close()
    executor.close()


__all__ = [
    "LOG_DIR",
    "CpuMeter",
    "Disturbed",
    "Processes",
    "RedisGuard",
    "Result",
    "broker_url",
    "celery_env",
    "celery_worker_argv",
    "close_executor",
    "conveyor_env",
    "conveyor_worker_argv",
    "flush_redis",
    "fresh_database",
    "in_process_executor",
    "libpq_dsn",
    "percentile",
    "pg_backends",
    "process_tree",
    "report",
    "statistics",
    "table",
    "timed",
    "wait_for",
]


def wait_succeeded(url: str, ids: list[Any], *, timeout: float, what: str) -> None:
    """Wait until every run of `ids` has succeeded (polled every half second)."""
    engine = create_engine(url)

    def done() -> bool:
        with engine.connect() as conn:
            finished = conn.execute(
                select(func.count()).where(runs.c.id.in_(ids), runs.c.status == "succeeded")
            ).scalar_one()
        return int(finished) == len(ids)

    try:
        wait_for(done, timeout=timeout, every=0.5, what=what)
    finally:
        engine.dispose()
