"""Enqueue throughput: Celery's apply_async publish loop vs conveyor's enqueue and enqueue_many.

conveyor writes every run (which is also its delivery intent) to PostgreSQL and then publishes
it to the same Redis; Celery only publishes. Nothing consumes, so the queue's backlog grows:
- "one by one, published": fair share off (`dispatch_in_flight=0`), so every run is written
  and published, as when workers keep up with the producer;
- "one by one, fair share": the default; past 100 runs in flight the queue is full and each
  new run is written to wait for its project's turn, unpublished;
- "8 threads": eight producers enqueueing one at a time on one Client (PostgreSQL commits
  their transactions together), against one thread in the same run; the threads are kept
  from one measurement to the next and warmed first (their connections open), as the one
  thread is.
Per-call latencies (p50/p99) are printed for the one-by-one loops.
Run: `python -m bench.enqueue [--runs N]`.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from celery import Celery

from bench.common import (
    Result,
    broker_url,
    flush_redis,
    fresh_database,
    percentile,
    report,
    table,
    timed,
)
from conveyor import Client
from domain.settings import load_settings
from domain.tasks.registry import REGISTRY, task


@task(name="bench_noop")
def bench_noop(ctx, i: int) -> None:  # type: ignore[no-untyped-def]
    """Never executed here: only enqueued (its signature validates the params)."""


def latencies(n: int, call: Callable[[int], object]) -> list[float]:
    """Milliseconds of each of `n` calls."""
    took = []
    for i in range(n):
        started = time.perf_counter()
        call(i)
        took.append((time.perf_counter() - started) * 1000)
    return took


class Producers:
    """`threads` producer threads kept for the whole benchmark, as a web server's pool keeps
    its threads: each has made its first call (opened its connections) before any is timed,
    as the one-thread loop has."""

    def __init__(self, threads: int, call: Callable[[int], object]) -> None:
        self.threads = threads
        self.call = call
        self.pool = ThreadPoolExecutor(max_workers=threads)
        ready = threading.Barrier(threads)  # so that each warm-up call has a thread of its own

        def warm(k: int) -> None:
            ready.wait()
            call(k)

        list(self.pool.map(warm, range(threads)))

    def run(self, n: int) -> Callable[[], None]:
        """`n` calls shared by the threads, each one call at a time."""
        share = n // self.threads

        def chunk(k: int) -> None:
            for i in range(share):
                self.call(k * share + i)

        def run() -> None:
            list(self.pool.map(chunk, range(self.threads)))

        return run

    def close(self) -> None:
        self.pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5000, help="runs per measurement")
    parser.add_argument("--batch", type=int, default=1000, help="enqueue_many batch size")
    parser.add_argument("--threads", type=int, default=8, help="producer threads")
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
    assert "bench_noop" in REGISTRY
    published = Client(
        load_settings(database_url=url, broker_url=broker_url(), dispatch_in_flight=0)
    )
    paced = Client(load_settings(database_url=url, broker_url=broker_url()))
    for client in (published, paced):
        client.enqueue("bench_noop", {"i": 0})  # connect before timing

    def celery_call(i: int) -> None:
        noop.apply_async(args=[i])

    def published_call(i: int) -> None:
        published.enqueue("bench_noop", {"i": i})

    def paced_call(i: int) -> None:
        paced.enqueue("bench_noop", {"i": i})

    def loop(call: Callable[[int], object]) -> Callable[[], None]:
        return lambda: [call(i) for i in range(n)]  # type: ignore[func-returns-value]

    def batched() -> None:
        for start in range(0, n * 4, args.batch):
            published.enqueue_many(
                {"name": "bench_noop", "params": {"i": i}} for i in range(start, start + args.batch)
            )

    producers = Producers(args.threads, published_call)
    baseline = timed("celery apply_async loop (publish only)", n, loop(celery_call))
    one = timed("conveyor enqueue, one by one, published (PG + publish)", n, loop(published_call))
    results: list[Result] = [
        baseline,
        one,
        timed("conveyor enqueue, one by one, fair share (PG; paced past 100)", n, loop(paced_call)),
        timed(
            f"conveyor enqueue, {args.threads} threads one by one, published",
            n,
            producers.run(n),
        ),
        timed(f"conveyor enqueue_many, batches of {args.batch} (PG + publish)", n * 4, batched),
    ]
    took = {
        "celery apply_async": latencies(n, celery_call),
        "conveyor enqueue, published": latencies(n, published_call),
        "conveyor enqueue, fair share": latencies(n, paced_call),
    }
    producers.close()
    flush_redis()
    published.close()
    paced.close()
    print(f"\nenqueue: {n} runs per loop ({n * 4} for enqueue_many), best of 3, this machine\n")
    report(results, baseline)
    print("\nper call, ms:")
    table(
        ["call", "p50", "p99", "max"],
        [
            [label, f"{percentile(ms, 50):.3f}", f"{percentile(ms, 99):.3f}", f"{max(ms):.1f}"]
            for label, ms in took.items()
        ],
    )
    print(
        f"\nenqueue one by one vs Celery's publish loop: {one.rate / baseline.rate:.2f}x "
        "(target >= 0.6x); p99 "
        f"{percentile(took['conveyor enqueue, published'], 99):.2f} ms (target <= 3 ms)"
    )
    print(
        f"{args.threads} threads vs one: {results[3].rate / one.rate:.2f}x (target >= 2x); "
        f"enqueue_many vs Celery's publish loop: {results[4].rate / baseline.rate:.1f}x "
        "(target >= 10x)"
    )


if __name__ == "__main__":
    main()
