"""Throughput: no-op tasks through 2 worker processes, conveyor beside two Celery baselines.

Three systems on the same Redis and the same PostgreSQL server, each with one
`worker -P prefork -c 2` (two pool children doing the work; the consumer process in front of
them is the same Celery code for all three):
- bare Celery: no result backend; each task INCRs a Redis counter, which is how the benchmark
  sees it finished (that round trip is left in Celery's time; nothing is subtracted);
- Celery + its SQLAlchemy database result backend (`db+postgresql+psycopg://`); a task is done
  when its SUCCESS row is in `celery_taskmeta`;
- conveyor with full persistence: `Client.enqueue_many` (insert + Redis publish), claim, one
  `ctx.log` line, final state; a run is done when its row says `succeeded`.
Wall time runs from the first enqueue to the moment the benchmark sees the last task done
(polled every 20 ms for all three). The Celery baselines publish with an `apply_async` loop
(Celery has no batch enqueue); conveyor with `enqueue_many` (or one at a time: `--producer`).
Celery runs with its defaults (prefetch multiplier 4, no task events); conveyor with its own
(prefetch 1, task events on for Flower): conveyor pays for its choices. All workers log at WARNING.

Every worker group starts first and warms up; then the rounds interleave (bare, db, conveyor,
bare, ...), so a burst from a neighbour on this machine hits all three alike; each system's
best round is reported. CPU columns: seconds of CPU per 1,000 tasks used by the worker
processes (consumer + children) and by the PostgreSQL backends serving that system, averaged
over the rounds: unlike wall time, they hardly move when the machine is shared.

Every batch here is past CONVEYOR_DISPATCH_IN_FLIGHT (100), so conveyor's runs go out in turns
(fair share, domain/flow/fair.py); `--in-flight 0` turns that off, for its cost.
`--producer single` enqueues conveyor's runs one `Client.enqueue` at a time, as a web request
or a webhook does, while the workers run them.

Run: `python -m bench.throughput [--tasks 5000] [--rounds 3] [--in-flight 100]
[--producer batch|single]`.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from bench.celery_baseline import DONE_KEY, make_app
from bench.common import (
    CpuMeter,
    Disturbed,
    Processes,
    RedisGuard,
    broker_url,
    celery_env,
    celery_worker_argv,
    conveyor_env,
    conveyor_worker_argv,
    flush_redis,
    fresh_database,
    pg_backends,
    process_tree,
    table,
    wait_for,
)
from conveyor import Client
from domain.logging import configure_logging
from domain.settings import load_settings

CONCURRENCY = 2
WARMUP = 50
TARGET_VS_DB = 1.5
TARGET_VS_BARE = 0.75


@dataclass
class System:
    """One system under test: how to send n tasks, and how many it has finished so far."""

    label: str
    send: Callable[[int], None]
    done: Callable[[], int]
    database: str | None = None
    worker: subprocess.Popen[bytes] | None = None
    n: int = 0  # tasks per measured round
    times: list[float] = field(default_factory=list)
    worker_cpu: list[float] = field(default_factory=list)
    db_cpu: list[float] = field(default_factory=list)

    def run(self, n: int, timeout: float, guard: RedisGuard) -> float:
        """Time n tasks; a round voided by a FLUSHALL elsewhere is measured again."""
        for _ in range(3):
            try:
                return self._run_once(n, timeout, guard)
            except Disturbed as exc:
                print(f"  {self.label}: {exc}; measuring this round again", flush=True)
                self._settle()
        raise SystemExit(f"{self.label}: Redis was emptied three times in a row; try later")

    def _run_once(self, n: int, timeout: float, guard: RedisGuard) -> float:
        assert self.worker is not None
        worker_cpu = CpuMeter(lambda: process_tree(self.worker.pid))  # type: ignore[union-attr]
        db = self.database
        db_cpu = CpuMeter(lambda: pg_backends(db) if db else [])
        guard.arm()
        target = self.done() + n
        worker_cpu.start()
        db_cpu.start()
        started = time.perf_counter()
        self.send(n)

        def finished() -> bool:
            guard.check()
            return self.done() >= target

        seconds = wait_for(finished, timeout=timeout, what=self.label) - started
        self.worker_cpu.append(worker_cpu.stop() / n)
        self.db_cpu.append(db_cpu.stop() / n)
        self.times.append(seconds)
        return seconds

    def _settle(self) -> None:
        """Wait until what survived the flush has drained (the count stops moving)."""
        last, still = -1, 0
        while still < 10:
            now = self.done()
            still = still + 1 if now == last else 0
            last = now
            time.sleep(0.2)

    def reset(self) -> None:
        self.times.clear()
        self.worker_cpu.clear()
        self.db_cpu.clear()

    @property
    def rate(self) -> float:
        """Tasks per second in the best round."""
        return self.n / min(self.times)


def count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one() or 0)


def celery_system(label: str, backend_url: str, queue: str, done: Callable[[], int]) -> System:
    app = make_app(broker_url(), backend_url, queue)
    noop = app.tasks["bench.noop"]

    def send(n: int) -> None:
        with app.producer_or_acquire() as producer:
            for i in range(n):
                noop.apply_async(args=[i], producer=producer)

    database = make_url(backend_url.removeprefix("db+")).database if backend_url else None
    return System(label, send, done, database)


def build_systems(
    url: str, celery_url: str, batch: int, in_flight: int, producer: str = "batch"
) -> tuple[list[System], Client]:
    r = redis.Redis.from_url(broker_url())
    conveyor_db = create_engine(url, pool_size=1)
    celery_db = create_engine(celery_url, pool_size=1)

    def db_done() -> int:  # the table appears with the first stored result
        if count(celery_db, "SELECT count(*) FROM pg_class WHERE relname = 'celery_taskmeta'"):
            return count(celery_db, "SELECT count(*) FROM celery_taskmeta WHERE status='SUCCESS'")
        return 0

    settings = load_settings(
        database_url=url,
        broker_url=broker_url(),
        task_modules="bench.tasks",
        dispatch_in_flight=in_flight,
    )
    client = Client(settings)

    def conveyor_send(n: int) -> None:
        if producer == "single":  # as a web request or a webhook enqueues: one at a time
            for i in range(n):
                client.enqueue("bench_noop", {"i": i})
            return
        for start in range(0, n, batch):
            client.enqueue_many(
                {"name": "bench_noop", "params": {"i": i}}
                for i in range(start, min(n, start + batch))
            )

    backend_url = "db+" + celery_url
    systems = [
        celery_system(
            "bare Celery (Redis, no result backend)",
            "",
            "bench_bare",
            lambda: int(r.get(DONE_KEY) or 0),
        ),
        celery_system("Celery + SQLAlchemy DB result backend", backend_url, "bench_db", db_done),
        System(
            "conveyor (claim + 1 log line + final state)",
            conveyor_send,
            lambda: count(conveyor_db, "SELECT count(*) FROM runs WHERE status = 'succeeded'"),
            make_url(url).database,
        ),
    ]
    return systems, client


def start_workers(
    procs: Processes, systems: list[System], url: str, celery_url: str, in_flight: int
) -> None:
    bare, db, conveyor = systems
    bare.worker = procs.start(
        celery_worker_argv("bench-bare", CONCURRENCY, "bench_bare"),
        celery_env(BENCH_CELERY_QUEUE="bench_bare"),
        "throughput-bare",
    )
    db.worker = procs.start(
        celery_worker_argv("bench-db", CONCURRENCY, "bench_db"),
        celery_env(BENCH_CELERY_QUEUE="bench_db", BENCH_CELERY_BACKEND="db+" + celery_url),
        "throughput-db",
    )
    conveyor.worker = procs.start(
        conveyor_worker_argv("bench-conveyor", CONCURRENCY),
        conveyor_env(url, CONVEYOR_DISPATCH_IN_FLIGHT=str(in_flight)),
        "throughput-conveyor",
    )


def check_conveyor(url: str) -> tuple[int, int]:
    """Every conveyor run succeeded with its log line (pending ones can only be those whose
    messages a FLUSHALL elsewhere took away)."""
    engine = create_engine(url, pool_size=1)
    bad = count(engine, "SELECT count(*) FROM runs WHERE status NOT IN ('succeeded', 'pending')")
    succeeded = count(engine, "SELECT count(*) FROM runs WHERE status = 'succeeded'")
    lines = count(engine, "SELECT count(*) FROM run_logs")
    engine.dispose()
    if bad or lines != succeeded:
        raise SystemExit(f"conveyor: {bad} runs failed; {lines} log lines for {succeeded} runs")
    return succeeded, lines


def print_report(systems: list[System], n: int, rounds: int) -> None:
    bare, db, conveyor = systems
    print(
        f"\nthroughput: {n} no-op tasks per round, 2 worker processes (prefork -c {CONCURRENCY}), "
        f"best of {rounds} interleaved rounds, this machine\n"
    )

    def ms(values: list[float]) -> str:
        return f"{1000 * sum(values) / len(values):.2f}"

    table(
        [
            "system",
            "tasks/s",
            "seconds",
            "vs bare",
            "vs Celery+DB",
            "worker CPU ms/task",
            "PG CPU ms/task",
        ],
        [
            [
                s.label,
                f"{s.rate:,.0f}",
                f"{min(s.times):.2f}",
                f"{s.rate / bare.rate:.2f}x",
                f"{s.rate / db.rate:.2f}x",
                ms(s.worker_cpu),
                ms(s.db_cpu) if s.database else "-",
            ]
            for s in systems
        ],
    )
    vs_db, vs_bare = conveyor.rate / db.rate, conveyor.rate / bare.rate
    print(
        f"\nconveyor vs Celery+DB backend: {vs_db:.2f}x (target >= {TARGET_VS_DB}x): "
        f"{'met' if vs_db >= TARGET_VS_DB else 'MISSED'}"
    )
    print(
        f"conveyor vs bare Celery:       {vs_bare:.2f}x (target >= {TARGET_VS_BARE}x): "
        f"{'met' if vs_bare >= TARGET_VS_BARE else 'MISSED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per round (as issue 4 sets)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best counts")
    parser.add_argument("--batch", type=int, default=500, help="conveyor enqueue_many batch size")
    parser.add_argument("--timeout", type=float, default=300, help="per-round limit, seconds")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=100,
        help="CONVEYOR_DISPATCH_IN_FLIGHT: each batch past it goes out in turns (0: never)",
    )
    parser.add_argument(
        "--producer",
        choices=["batch", "single"],
        default="batch",
        help="conveyor's producer: enqueue_many in batches, or Client.enqueue one at a time "
        "(the Celery baselines always publish one at a time)",
    )
    args = parser.parse_args()
    configure_logging(level="WARNING")

    url = fresh_database("conveyor_bench_throughput")
    celery_url = fresh_database("conveyor_bench_celery", migrate=False)
    flush_redis()
    systems, client = build_systems(url, celery_url, args.batch, args.in_flight, args.producer)
    guard = RedisGuard()
    try:
        with Processes() as procs:
            start_workers(procs, systems, url, celery_url, args.in_flight)
            for system in systems:  # workers up, both pool children warm, connections made
                system.run(WARMUP, timeout=120, guard=guard)
                system.reset()
                system.n = args.tasks
            for round_no in range(1, args.rounds + 1):
                for system in systems:
                    procs.check_alive()
                    seconds = system.run(args.tasks, timeout=args.timeout, guard=guard)
                    print(
                        f"round {round_no}: {system.label}: {args.tasks / seconds:,.0f} tasks/s",
                        flush=True,
                    )
    finally:
        client.close()
        flush_redis()
    succeeded, lines = check_conveyor(url)
    print_report(systems, args.tasks, args.rounds)
    print(f"({succeeded} conveyor runs succeeded, {lines} log lines stored; none failed)")


if __name__ == "__main__":
    main()
