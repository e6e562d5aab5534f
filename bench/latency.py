"""Enqueue -> start latency at about 50% load: conveyor beside bare Celery, in the same run.

Both systems run one `worker -P prefork -c 2` on the same Redis (conveyor also on PostgreSQL).
For each system in turn:
1. its maximum throughput is probed: a burst of --probe no-op tasks, timed from the first
   enqueue until the last is done (as bench/throughput.py measures);
2. tasks are then submitted at half that rate (or at --rate for both) for --seconds, paced
   one at a time (when the pacer falls behind, the overdue ones go together: one
   enqueue_many for conveyor, back-to-back apply_async for Celery).
Latency, per task:
- conveyor: `started_at - created_at` from its runs row (created_at: when Client.enqueue began;
  started_at: when a worker claimed the run), both from the same machine clock;
- bare Celery: the task `bench.stamp(sent)` gets `time.time()` taken just before apply_async
  and RPUSHes `time.time() - sent` to Redis when its body starts.

Run: `python -m bench.latency [--seconds 20] [--rate R]`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import redis
from sqlalchemy import create_engine, text

from bench.celery_baseline import DONE_KEY, LATENCY_KEY, make_app
from bench.common import (
    Processes,
    RedisGuard,
    broker_url,
    celery_env,
    celery_worker_argv,
    conveyor_env,
    conveyor_worker_argv,
    flush_redis,
    fresh_database,
    percentile,
    table,
    wait_for,
)
from conveyor import Client
from domain.clock import utc_now
from domain.logging import configure_logging
from domain.settings import load_settings

CONCURRENCY = 2


@dataclass
class Measured:
    label: str
    max_rate: float  # probed, tasks/s
    offered: float  # tasks/s submitted during the paced phase
    achieved: float  # tasks/s the pacer actually submitted
    latencies: list[float]


def paced(rate: float, seconds: float, send: Callable[[int], None]) -> tuple[int, float]:
    """Submit at `rate`/s for `seconds`; send(k) submits k tasks. Returns (count, real rate)."""
    started = time.perf_counter()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - started) * rate) + 1) - sent
        if due > 0:
            send(due)
            sent += due
        else:
            time.sleep(max(0.0, started + (sent + 1) / rate - time.perf_counter()))
    return sent, sent / (time.perf_counter() - started)


def measure_conveyor(client: Client, url: str, probe: int, args: argparse.Namespace) -> Measured:
    engine = create_engine(url, pool_size=1)

    def succeeded() -> int:
        with engine.connect() as conn:
            query = text("SELECT count(*) FROM runs WHERE status = 'succeeded'")
            return int(conn.execute(query).scalar_one())

    def send(k: int) -> None:
        if k == 1:
            client.enqueue("bench_noop", {"i": 0})
        else:
            client.enqueue_many({"name": "bench_noop", "params": {"i": i}} for i in range(k))

    base = succeeded()
    started = time.perf_counter()
    for start in range(0, probe, 500):
        send(min(500, probe - start))
    at = wait_for(lambda: succeeded() >= base + probe, timeout=300, what="conveyor probe")
    max_rate = probe / (at - started)
    rate = args.rate or max_rate / 2

    since: datetime = utc_now()
    base = succeeded()
    count, achieved = paced(rate, args.seconds, send)
    wait_for(lambda: succeeded() >= base + count, timeout=300, what="conveyor paced runs")
    with engine.connect() as conn:
        latencies = [
            float(x)
            for x in conn.execute(
                text(
                    "SELECT extract(epoch FROM started_at - created_at) FROM runs "
                    "WHERE created_at >= :since"
                ),
                {"since": since},
            ).scalars()
        ]
    engine.dispose()
    return Measured("conveyor", max_rate, rate, achieved, latencies)


def measure_celery(probe: int, args: argparse.Namespace) -> Measured:
    app = make_app(broker_url(), "", "bench_bare")
    noop, stamp = app.tasks["bench.noop"], app.tasks["bench.stamp"]
    r = redis.Redis.from_url(broker_url())

    def done() -> int:
        return int(r.get(DONE_KEY) or 0)

    with app.producer_or_acquire() as producer:
        base = done()
        started = time.perf_counter()
        for i in range(probe):
            noop.apply_async(args=[i], producer=producer)
        at = wait_for(lambda: done() >= base + probe, timeout=300, what="Celery probe")
        max_rate = probe / (at - started)
        rate = args.rate or max_rate / 2

        def send(k: int) -> None:
            for _ in range(k):
                stamp.apply_async(args=[time.time()], producer=producer)

        r.delete(LATENCY_KEY)
        count, achieved = paced(rate, args.seconds, send)
    wait_for(lambda: r.llen(LATENCY_KEY) >= count, timeout=300, what="Celery paced tasks")
    latencies = [float(x) for x in r.lrange(LATENCY_KEY, 0, -1)]
    return Measured("bare Celery", max_rate, rate, achieved, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20, help="paced phase, per system")
    parser.add_argument("--probe", type=int, default=1000, help="burst that finds max rate")
    parser.add_argument("--rate", type=float, default=0, help="offer this rate to both")
    args = parser.parse_args()
    configure_logging(level="WARNING")

    url = fresh_database("conveyor_bench_latency")
    flush_redis()
    settings = load_settings(database_url=url, broker_url=broker_url(), task_modules="bench.tasks")
    client = Client(settings)
    guard = RedisGuard()
    results: list[Measured] = []
    try:
        with Processes() as procs:
            procs.start(
                celery_worker_argv("bench-bare", CONCURRENCY, "bench_bare"),
                celery_env(BENCH_CELERY_QUEUE="bench_bare"),
                "latency-bare",
            )
            procs.start(
                conveyor_worker_argv("bench-conveyor", CONCURRENCY),
                conveyor_env(url),
                "latency-conveyor",
            )
            measure_celery(50, argparse.Namespace(rate=50, seconds=1))  # warm up both
            measure_conveyor(client, url, 50, argparse.Namespace(rate=50, seconds=1))
            for measure in (
                lambda: measure_celery(args.probe, args),
                lambda: measure_conveyor(client, url, args.probe, args),
            ):
                guard.arm()
                procs.check_alive()
                results.append(measure())
                guard.check()
                m = results[-1]
                print(
                    f"{m.label}: max {m.max_rate:,.0f}/s, offered {m.offered:,.0f}/s, "
                    f"p50 {percentile(m.latencies, 50) * 1000:.1f} ms",
                    flush=True,
                )
    finally:
        client.close()
        flush_redis()

    print(
        f"\nlatency: enqueue -> start at about 50% load, 2 worker processes (prefork "
        f"-c {CONCURRENCY}), {args.seconds:g} s per system, this machine\n"
    )

    def ms(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:,.1f}"

    table(
        ["system", "max/s", "offered/s", "tasks", "p50 ms", "p90 ms", "p99 ms", "max ms"],
        [
            [
                m.label,
                f"{m.max_rate:,.0f}",
                f"{m.achieved:,.0f}",
                len(m.latencies),
                ms(m.latencies, 50),
                ms(m.latencies, 90),
                ms(m.latencies, 99),
                ms(m.latencies, 100),
            ]
            for m in results
        ],
    )
    celery, conveyor = results
    print(
        f"\nconveyor / bare Celery: p50 "
        f"{percentile(conveyor.latencies, 50) / percentile(celery.latencies, 50):.2f}x, "
        f"p99 {percentile(conveyor.latencies, 99) / percentile(celery.latencies, 99):.2f}x "
        "(lower is better; no target in the issue, printed beside Celery's)"
    )


if __name__ == "__main__":
    main()
