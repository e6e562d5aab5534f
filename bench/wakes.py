"""Waking from `ctx.sleep`: how late a sleeping run goes on after its wake time, beside the same
task enqueued as a delayed run (`not_before`) for the same time, in the same run.

A real `conveyor scheduler` (its relay delivers due runs) and `conveyor worker -c 2` on
PostgreSQL and a private Redis. For each kind in turn, N runs are given wake times spread at
--rate per second, starting --lead seconds ahead: time enough for every sleeper to reach its
sleep and park, holding no worker (with less, the parking overlaps the wakes and is measured
with them). `bench_wake` sleeps until its time, `bench_delayed` is enqueued with not_before at
it. Each returns `time.time() - its time` when it runs again (or starts). Target: a sleeper
starts within 100 ms of its wake time at 200 wakes/s (p50; p99 shown).

Run: `python -m bench.wakes [--runs 1000] [--rate 200]`.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from sqlalchemy import create_engine, select

from bench.common import (
    Processes,
    conveyor_env,
    conveyor_worker_argv,
    fresh_database,
    percentile,
    table,
    wait_succeeded,
)
from conveyor import Client
from domain.db.models import runs
from domain.logging import configure_logging
from domain.settings import load_settings


def measure(client: Client, url: str, name: str, n: int, rate: float, lead: float) -> list[float]:
    start = time.time() + lead
    times = [start + i / rate for i in range(n)]
    if name == "bench_wake":
        items = [{"name": name, "params": {"at": t}} for t in times]
    else:
        items = [
            {"name": name, "params": {"at": t}, "not_before": datetime.fromtimestamp(t, UTC)}
            for t in times
        ]
    made = [r.id for r in client.enqueue_many(items)]
    wait_succeeded(url, made, timeout=lead + n / rate + 120, what=f"{n} {name} runs")
    engine = create_engine(url)
    with engine.connect() as conn:
        late = conn.execute(select(runs.c.result).where(runs.c.id.in_(made))).scalars().all()
    engine.dispose()
    return [float(x) for x in late]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="wake times per second")
    parser.add_argument("--lead", type=float, default=45.0, help="seconds before the first")
    args = parser.parse_args()
    configure_logging("console", "WARNING")
    url = fresh_database("conveyor_bench_wakes")
    env = conveyor_env(url)
    results = {}
    with Processes() as procs:
        procs.start(["-m", "conveyor", "scheduler"], env, "wakes-scheduler")
        procs.start(conveyor_worker_argv("wakes", 2), env, "wakes-worker")
        settings = load_settings(
            database_url=url, broker_url=env["CONVEYOR_BROKER_URL"], task_modules="bench.tasks"
        )
        with Client(settings) as client:
            for name in ("bench_delayed", "bench_wake"):
                results[name] = measure(client, url, name, args.runs, args.rate, args.lead)
    rows = []
    for name, label in (("bench_delayed", "delayed run (baseline)"), ("bench_wake", "sleeper")):
        late = results[name]
        rows.append(
            [label, f"{percentile(late, 50) * 1000:.1f}", f"{percentile(late, 99) * 1000:.1f}"]
        )
    print(f"\nwakes: {args.runs} runs due at {args.rate:.0f}/s, ms late, this machine\n")
    table(["what", "p50 ms", "p99 ms"], rows)
    wake_p50 = percentile(results["bench_wake"], 50)
    base_p50 = percentile(results["bench_delayed"], 50)
    print(f"\nratio (sleeper p50 / delayed run p50): {wake_p50 / base_p50:.2f}x")
    print(
        f"sleeper p50 {wake_p50 * 1000:.1f} ms (target <= 100 ms): "
        f"{'met' if wake_p50 <= 0.1 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
