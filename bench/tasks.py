"""Tasks the benchmarks run through real conveyor workers (`CONVEYOR_TASK_MODULES=bench.tasks`)."""

from __future__ import annotations

import time

from conveyor import Limit, task


@task
def bench_noop(ctx, i: int) -> None:  # type: ignore[no-untyped-def]
    """The throughput and latency unit: one log line, then the final state."""
    ctx.log("noop")


@task
def bench_log_lines(ctx, n: int) -> int:  # type: ignore[no-untyped-def]
    """Writes `n` lines, each starting with the wall-clock time it was logged (for latency)."""
    log, now = ctx.log, time.time
    for i in range(n):
        log(f"{now():.6f} line {i}")
    return n


@task(queue="bench-parked")
def bench_parked(ctx, i: int) -> None:  # type: ignore[no-untyped-def]
    """bench.api --park-hook-runs: webhook runs land on a queue the bench worker does not
    consume, so the worker keeps running exactly the feeder's rate."""


@task
def bench_wake(ctx, at: float) -> float:  # type: ignore[no-untyped-def]
    """Sleeps (ctx.sleep_until, holding no worker) until the unix time `at`; how late it woke."""
    from datetime import UTC, datetime

    ctx.sleep_until(datetime.fromtimestamp(at, UTC))
    return time.time() - at


@task
def bench_delayed(ctx, at: float) -> float:  # type: ignore[no-untyped-def]
    """The baseline: a run enqueued with not_before = `at`; how late it started."""
    return time.time() - at


@task(concurrency=Limit(key="{key}", max=1))
def bench_keyed(ctx, key: str, seconds: float = 0.005) -> None:  # type: ignore[no-untyped-def]
    """A short run holding its key's one slot (bench/limits.py)."""
    time.sleep(seconds)


@task
def bench_unkeyed(ctx, key: str, seconds: float = 0.005) -> None:  # type: ignore[no-untyped-def]
    """The same run without a key: the baseline of bench/limits.py."""
    time.sleep(seconds)
