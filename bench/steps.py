"""Checkpointed steps: what a no-op `ctx.step(name, fn)` adds, and what replaying completed
steps costs, beside the same task without steps, in the same run.

- per step: R runs of a task making K no-op checkpointed steps, against R runs of the same task
  calling the function directly; (p50 with steps - p50 without) / K. Target: <= 1 ms on
  PostgreSQL.
- replay: a run whose first attempt completed K steps and then failed; the second attempt's
  time to get through the K steps (they are returned from the history, not run), measured
  inside the task. Target: <= 20 ms for 100 steps.

The executor runs in this process with a real LogWriter and RunMonitor on PostgreSQL (the
worker's code path without the broker hop, which bench/throughput.py measures).
Run: `python -m bench.steps [--runs 30] [--steps 100]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from sqlalchemy import update

from bench.common import close_executor, fresh_database, in_process_executor
from domain.clock import utc_now
from domain.db.engine import create_db_engine
from domain.db.models import Run
from domain.db.unit_of_work import UnitOfWork
from domain.runs import enqueue
from domain.runs.requests import build_request
from domain.tasks.registry import Registry, RegistryCatalog
from worker import capture
from worker.logwriter import LogWriter


def noop(i: int) -> int:
    return i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30, help="runs per measurement")
    parser.add_argument("--steps", type=int, default=100, help="steps per run")
    args = parser.parse_args()
    k = args.steps

    url = fresh_database("conveyor_bench_steps")
    engine = create_db_engine(url, pool_size=3, pre_ping=False)
    writer = LogWriter(engine)
    writer.start()
    capture.install()
    registry = Registry()
    replay_s: list[float] = []

    @registry.task(max_attempts=1)
    def plain(ctx: Any) -> int:
        return sum(noop(i) for i in range(k))

    @registry.task(max_attempts=1)
    def stepped(ctx: Any) -> int:
        return sum(ctx.step("noop", noop, i) for i in range(k))

    @registry.task(max_attempts=2, retry_backoff=3600.0)
    def replayed(ctx: Any) -> int:
        started = time.perf_counter()
        total = sum(ctx.step("noop", noop, i) for i in range(k))
        if ctx.attempt == 1:
            raise RuntimeError("fail once every step completed")
        replay_s.append(time.perf_counter() - started)
        return total

    executor = in_process_executor(engine, writer, registry)

    catalog = RegistryCatalog(registry)

    def new_run(name: str) -> Any:
        return enqueue.enqueue(UnitOfWork(engine), build_request(name=name), catalog=catalog).run.id

    def one(name: str) -> float:
        run_id = new_run(name)
        started = time.perf_counter()
        outcome = executor.execute(run_id)
        elapsed = time.perf_counter() - started
        if outcome.status != "succeeded":
            raise SystemExit(f"{name} ended {outcome.status}")
        return elapsed

    def replay_once() -> None:
        run_id = new_run("replayed")
        if executor.execute(run_id).status != "retrying":
            raise SystemExit("the first attempt should have failed and be retried")
        with engine.begin() as conn:  # the backoff is over
            conn.execute(update(Run).where(Run.id == run_id).values(not_before=utc_now()))
        if executor.execute(run_id).status != "succeeded":
            raise SystemExit("the replaying attempt should have succeeded")

    one("plain"), one("stepped")  # warm: prepared statements, caches
    without = [one("plain") for _ in range(args.runs)]
    with_steps = [one("stepped") for _ in range(args.runs)]
    for _ in range(args.runs):
        replay_once()
    report(args.runs, k, without, with_steps, replay_s)
    close_executor(executor)
    writer.close()
    engine.dispose()


def report(
    runs: int, k: int, without: list[float], with_steps: list[float], replay_s: list[float]
) -> None:
    p50_without, p50_with = statistics.median(without), statistics.median(with_steps)
    per_step_ms = (p50_with - p50_without) / k * 1000
    replay_ms = statistics.median(replay_s) * 1000

    print(f"\nsteps: {runs} runs of {k} no-op steps each, p50, PostgreSQL, this machine\n")
    print(f"{'what':<52} {'p50 ms':>9}")
    print(f"{'the task calling the function directly (baseline)':<52} {p50_without * 1000:>9.2f}")
    print(f"{'the same task, each call a checkpointed step':<52} {p50_with * 1000:>9.2f}")
    print(f"{'ratio (with steps / without)':<52} {p50_with / p50_without:>8.1f}x")
    print(
        f"\nadded per step: {per_step_ms:.3f} ms (target <= 1 ms): "
        f"{'met' if per_step_ms <= 1 else 'MISSED'}"
    )
    print(
        f"replaying {k} completed steps: {replay_ms:.2f} ms (target <= 20 ms for 100): "
        f"{'met' if replay_ms <= 20 * k / 100 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
