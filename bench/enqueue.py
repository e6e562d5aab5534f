"""Enqueue throughput: Celery's apply_async publish loop vs conveyor's enqueue and enqueue_many.

conveyor writes every run (which is also its delivery intent) to PostgreSQL and then publishes
it to the same Redis; Celery only publishes. Run: `python -m bench.enqueue [--runs N]`.
"""

from __future__ import annotations

import argparse

from celery import Celery

from bench.common import Result, broker_url, flush_redis, fresh_database, report, timed
from conveyor import Client
from domain.settings import load_settings
from domain.tasks.registry import REGISTRY, task


@task(name="bench_noop")
def bench_noop(ctx, i: int) -> None:  # type: ignore[no-untyped-def]
    """Never executed here: only enqueued (its signature validates the params)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5000, help="runs per measurement")
    parser.add_argument("--batch", type=int, default=1000, help="enqueue_many batch size")
    args = parser.parse_args()
    n = args.runs

    url = fresh_database("conveyor_bench_enqueue")
    flush_redis()
    celery = Celery("baseline", broker=broker_url(), set_as_current=False)
    celery.conf.update(task_serializer="json", task_ignore_result=True)

    @celery.task(name="bench_noop")
    def noop(i: int) -> None:
        """The baseline's task; only published."""

    noop.apply_async(args=[0])  # connect before timing

    settings = load_settings(database_url=url, broker_url=broker_url())
    client = Client(settings)
    assert "bench_noop" in REGISTRY
    client.enqueue("bench_noop", {"i": 0})  # connect before timing

    def celery_loop() -> None:
        for i in range(n):
            noop.apply_async(args=[i])

    def one_by_one() -> None:
        for i in range(n):
            client.enqueue("bench_noop", {"i": i})

    def batched() -> None:
        for start in range(0, n * 4, args.batch):
            client.enqueue_many(
                {"name": "bench_noop", "params": {"i": i}} for i in range(start, start + args.batch)
            )

    baseline = timed("celery apply_async loop (publish only)", n, celery_loop)
    results: list[Result] = [
        baseline,
        timed("conveyor enqueue, one by one (PG + publish)", n, one_by_one),
        timed(f"conveyor enqueue_many, batches of {args.batch} (PG + publish)", n * 4, batched),
    ]
    flush_redis()
    client.close()
    print(f"\nenqueue: {n} runs per loop ({n * 4} for enqueue_many), best of 3, this machine\n")
    report(results, baseline)
    ratio = results[2].rate / baseline.rate
    print(f"\nenqueue_many vs Celery's publish loop: {ratio:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
