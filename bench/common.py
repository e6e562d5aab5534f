"""Shared setup for benchmarks: a fresh PostgreSQL database, a Redis database, timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from domain.migrate import upgrade

PG_ADMIN = os.environ.get("CONVEYOR_BENCH_PG", "postgresql+psycopg://127.0.0.1:5432/test")
REDIS_DB = int(os.environ.get("CONVEYOR_BENCH_REDIS_DB", "12"))
BROKER = f"redis://127.0.0.1:6379/{REDIS_DB}"


def fresh_database(name: str = "conveyor_bench") -> str:
    """Drop and recreate a database, migrate it, return its URL."""
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return url


def flush_redis() -> None:
    redis.Redis(db=REDIS_DB).flushdb()


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


__all__ = [
    "BROKER",
    "Result",
    "flush_redis",
    "fresh_database",
    "percentile",
    "report",
    "statistics",
    "timed",
]
