"""A year of history: reads at 20 requests/s and retention beside a worker, on PostgreSQL.

The data is built with COPY into a database of its own (dropped at exit): `--runs` runs spread
evenly over the last `--days` days (ids are uuid7s of their creation time, so they land in
their day's partitions), mostly finished (90% succeeded, 6% failed, 2% cancelled, 2% timed
out), with `--lines` log lines among them: `--big-runs` runs of 2,000 lines each (the runs a
detail reads its last 1,000 lines of), the rest spread evenly.

Then, each at 20 requests/s (an open loop: latency counts from when a request was due, so a
slow one delays the next and shows in the percentiles), p50 and p99 of:
- the runs list: a page of 50, newest first, with one status filter (a different status
  each request), as the API's reader (`PgReads.page`) reads it;
- a run's detail (`PgReads.detail`) with its last 1,000 lines (`PgReads.last_lines`);
- a day's stats (`run_stats_for`, one day): from the runs before any rollup exists, then
  from `run_stats` once `roll_up` has run over the history (in the scheduler's 2-second
  slices of its loop: printed, how many and the longest) and keeps it every minute;
- the dashboard overview (`overview.read_overview`).
These call the functions the API's routes call, in this process (bench/api.py measures the
HTTP layer). Target: each p99 <= 50 ms.

Retention (a day whose runs all may go goes with its partitions): first alone, deleting the
older half of what is past `--keep-days`; then a worker (its executor in a process of its own,
on no-op runs with one log line) runs `--window` seconds alone (the baseline) and on while
retention deletes the rest, resting after each transaction `--rest` times as long as it took
(7 by default, as the scheduler's retention does: `retention.REST`; alone it does not rest).
Printed: runs deleted per minute, alone and beside the worker (target >= 1,000,000), and the
worker's throughput beside retention against its baseline (target >= 0.9x).

Disk: about 1.7 kB per run with its 10 lines, indexes included: the default 10 M runs and
100 M lines made a 15.6 GiB database (have 25 GB free, for WAL while loading). The database is
dropped at exit. Here the default took 9-11 minutes to build and under one to roll up, the
reads and retention 10 more; `--small` (200,000 runs, 2 million lines, 20 days, keep 10)
runs in about four minutes.

Run: `python -m bench.history [--small] [--runs N] [--lines N] [--days N] [--keep-days N]
[--no-reads]` (`--no-reads`: build, then retention only).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.common import fresh_database, libpq_dsn, percentile, settle_database, table
from domain.db import partitions
from domain.db.engine import create_db_engine
from domain.db.unit_of_work import UnitOfWork
from domain.housekeeping.retention import REST, apply_retention
from domain.housekeeping.rollups import roll_up
from domain.housekeeping.stats import run_stats_for
from domain.runs import overview
from domain.runs.reads_pg import PgReads
from domain.runs.repository import RunFilter
from scheduler.service import HOUSEKEEPING_SLICE_S

STATUSES = ["succeeded"] * 45 + ["failed"] * 3 + ["cancelled", "timed_out"]
BIG_RUN_LINES = 2_000
RATE = 20.0  # requests per second, per kind of read
TARGET_P99_MS = 50.0

RUN_COLUMNS = (
    "id", "project", "kind", "name", "queue", "priority", "params", "status", "attempt",
    "max_attempts", "triggered_by", "not_before", "dispatch_attempts", "cost_usd", "tokens_in",
    "tokens_out", "requests_made", "cost_entry_count", "paced", "created_at", "started_at",
    "finished_at",
)  # fmt: skip
LINE_COLUMNS = ("run_id", "seq", "attempt", "ts", "stream", "level", "message")


def uuid7_at(ms: int, rand: random.Random) -> uuid.UUID:
    return uuid.UUID(int=ms << 80 | 0x7 << 76 | 0b10 << 62 | rand.getrandbits(62))


def build(url: str, *, runs: int, lines: int, days: int, big_runs: int) -> list[uuid.UUID]:
    """COPY the history in; the ids of the big runs."""
    rand = random.Random(7)
    now = datetime.now(UTC)
    start = now - timedelta(days=days)
    span_ms = days * 86_400_000
    start_ms = int(start.timestamp() * 1000)
    small_lines = max(0, lines - big_runs * BIG_RUN_LINES)
    per_run = small_lines // max(1, runs - big_runs)
    big_every = max(1, runs // max(1, big_runs))
    big: list[uuid.UUID] = []
    engine = create_db_engine(url, null_pool=True)
    with engine.begin() as conn:
        for n in range(days + 1):
            partitions.ensure(conn, today=(start + timedelta(days=n)).date(), ahead_days=1)
    engine.dispose()
    with psycopg.connect(libpq_dsn(url)) as conn:
        chunk = 50_000
        for first in range(0, runs, chunk):
            ids: list[tuple[uuid.UUID, datetime, int]] = []
            run_rows: list[str] = []
            for i in range(first, min(runs, first + chunk)):
                ms = start_ms + span_ms * i // runs
                run_id = uuid7_at(ms, rand)
                created = datetime.fromtimestamp(ms / 1000, UTC)
                n_lines = BIG_RUN_LINES if i % big_every == 0 and len(big) < big_runs else per_run
                if n_lines == BIG_RUN_LINES:
                    big.append(run_id)
                ids.append((run_id, created, n_lines))
                status = rand.choice(STATUSES)
                finished = created + timedelta(milliseconds=rand.randint(5, 5_000))
                run_rows.append(
                    f"{run_id}\tdefault\ttask\tjob{i % 20}\tdefault\t5\t{{}}\t{status}\t1\t1\tapi"
                    f"\t{created.isoformat()}\t1\t0\t0\t0\t0\t0\tf\t{created.isoformat()}"
                    f"\t{created.isoformat()}\t{finished.isoformat()}\n"
                )
            with conn.cursor().copy(f"COPY runs ({', '.join(RUN_COLUMNS)}) FROM STDIN") as copy:
                copy.write("".join(run_rows))
            with conn.cursor().copy(
                f"COPY run_logs ({', '.join(LINE_COLUMNS)}) FROM STDIN"
            ) as copy:
                for block in _line_blocks(ids):
                    copy.write(block)
            conn.commit()
            print(f"  built {min(runs, first + chunk):,} runs", flush=True)
    return big


def _line_blocks(ids: list[tuple[uuid.UUID, datetime, int]]) -> Iterator[str]:
    out: list[str] = []
    for run_id, created, n in ids:
        ts = created.isoformat()
        prefix = f"{run_id}\t"
        out.extend(
            f"{prefix}{seq}\t1\t{ts}\tlog\tinfo\tline {seq} of a run\n" for seq in range(1, n + 1)
        )
        if len(out) >= 20_000:
            yield "".join(out)
            out.clear()
    if out:
        yield "".join(out)


def paced(kind: str, call: Callable[[int], object], seconds: float) -> tuple[str, float, float]:
    """`call(i)` at RATE per second for `seconds`; (kind, p50 ms, p99 ms) from when each was due."""
    total = int(seconds * RATE)
    latencies = []
    begin = time.perf_counter()
    for i in range(total):
        due = begin + i / RATE
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        call(i)
        latencies.append((time.perf_counter() - due) * 1000)
    return kind, percentile(latencies, 50), percentile(latencies, 99)


def measure_reads(url: str, big: list[uuid.UUID], *, days: int, seconds: float) -> list[Any]:
    engine = create_db_engine(url, pool_size=2, pre_ping=False)
    reads = PgReads(url, pool_size=2)
    statuses = ["succeeded", "failed", "cancelled", "timed_out", "pending", "running"]
    now = datetime.now(UTC)
    day0 = (now - timedelta(days=days // 2)).replace(hour=0, minute=0, second=0, microsecond=0)

    def runs_list(i: int) -> None:
        reads.page(RunFilter(status=[statuses[i % len(statuses)]]), limit=50)

    def detail(i: int) -> None:
        run_id = big[i % len(big)]
        reads.detail(run_id)
        reads.last_lines(run_id, limit=1000)

    def day_stats(i: int) -> None:
        day = day0 - timedelta(days=i % max(1, days // 2))
        run_stats_for(UnitOfWork(engine), period="day", since=day, until=day + timedelta(days=1))

    def dashboard(i: int) -> None:
        overview.read_overview(UnitOfWork(engine), now=datetime.now(UTC))

    def measured(kind: str, call: Callable[[int], object]) -> None:
        for i in range(5):  # warm: prepared statements, caches
            call(i)
        results.append(paced(kind, call, seconds))

    results: list[Any] = []
    measured("runs list, a status filter, newest first", runs_list)
    measured("a run's detail + its last 1,000 lines", detail)
    measured("dashboard overview", dashboard)
    measured("a day's stats, from runs (no rollups yet)", day_stats)
    started, longest, slices = time.perf_counter(), 0.0, 0
    while True:  # the first pass, in the scheduler's slices of its loop
        began = time.perf_counter()
        rolled = roll_up(engine, now=now, until=began + HOUSEKEEPING_SLICE_S)
        longest, slices = max(longest, time.perf_counter() - began), slices + 1
        if rolled.caught_up:
            break
    print(
        f"  rolled up the history in {time.perf_counter() - started:,.1f} s: {slices} slices"
        f" of the scheduler's loop, the longest {longest:.2f} s"
    )
    measured("a day's stats, from rollups", day_stats)
    reads.close()
    engine.dispose()
    return results


def _worker(url: str, stop: Any, counts: Any) -> None:
    """A worker's executor on no-op runs with one log line, until `stop` is set: the time
    each run ended into `counts` (for the two windows: alone, beside retention)."""
    from bench.common import close_executor, in_process_executor
    from domain.runs import enqueue
    from domain.runs.requests import build_request
    from domain.tasks.registry import Registry, RegistryCatalog
    from worker import capture
    from worker.logwriter import LogWriter

    engine = create_db_engine(url, pool_size=3, pre_ping=False)
    writer = LogWriter(engine)
    writer.start()
    capture.install()
    registry = Registry()

    @registry.task(max_attempts=1)
    def noop(ctx: Any) -> None:
        ctx.log("noop")

    executor = in_process_executor(engine, writer, registry)
    catalog = RegistryCatalog(registry)
    while not stop.is_set():
        batch = enqueue.enqueue_many(
            UnitOfWork(engine), [build_request(name="noop") for _ in range(100)], catalog=catalog
        )
        for created in batch:
            executor.execute(created.run.id)
            counts.append(time.time())
    close_executor(executor)
    writer.close()
    engine.dispose()


def _retain(url: str, keep_days: float, rest: float) -> tuple[int, float]:
    """Retention of everything older than `keep_days`, all in one call: (runs, seconds)."""
    engine = create_db_engine(url, pre_ping=False)
    started = time.perf_counter()
    deleted = apply_retention(
        engine,
        now=datetime.now(UTC),
        default_days=keep_days,
        max_batches=10**6,
        batch=5_000,
        rest=rest,
    )
    seconds = time.perf_counter() - started
    engine.dispose()
    return deleted, seconds


def measure_retention(
    url: str, *, days: int, keep_days: float, window: float, rest: float
) -> dict[str, float]:
    """The older half of what is past `keep_days` deleted alone, then the worker alone for
    `window` s (its baseline), then the rest deleted beside the worker (resting `rest` times
    each transaction's time after it, as the scheduler's retention does)."""
    alone_runs, alone_s = _retain(url, (days + keep_days) / 2, rest=0.0)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        done = manager.list()
        stop = manager.Event()
        warm = 5.0
        begin = time.time() + warm
        proc = ctx.Process(target=_worker, args=(url, stop, done))
        proc.start()
        time.sleep(max(0.0, begin + window - time.time()))  # the baseline window
        started = time.time()
        deleted, retention_s = _retain(url, keep_days, rest=rest)  # the worker on throughout
        stop.set()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        stamps = list(done)
    alone = sum(begin <= t < begin + window for t in stamps) / window
    beside = sum(started <= t < started + retention_s for t in stamps) / max(retention_s, 1e-9)
    return {
        "alone_runs": alone_runs,
        "alone_per_minute": alone_runs / alone_s * 60,
        "deleted": deleted,
        "retention_s": retention_s,
        "per_minute": deleted / retention_s * 60,
        "alone": alone,
        "beside": beside,
    }


def database_size(url: str) -> int:
    with psycopg.connect(libpq_dsn(url)) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="200k runs, 2M lines, 20 days")
    parser.add_argument("--runs", type=int, default=10_000_000)
    parser.add_argument("--lines", type=int, default=100_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--keep-days", type=float, default=30.0, help="retention's age")
    parser.add_argument("--big-runs", type=int, default=200, help="runs of 2,000 lines")
    parser.add_argument("--seconds", type=float, default=15.0, help="per kind of read")
    parser.add_argument(
        "--no-reads", action="store_true", help="retention only: skip the reads and the rollup"
    )
    parser.add_argument("--window", type=float, default=20.0, help="worker baseline seconds")
    parser.add_argument(
        "--rest",
        type=float,
        default=REST,
        help="beside the worker, retention sleeps this many times each transaction's time",
    )
    args = parser.parse_args()
    if args.small:
        args.runs, args.lines, args.days, args.keep_days = 200_000, 2_000_000, 20, 10.0

    url = fresh_database("conveyor_bench_history")
    started = time.perf_counter()
    print(f"building {args.runs:,} runs and {args.lines:,} lines over {args.days} days")
    big = build(url, runs=args.runs, lines=args.lines, days=args.days, big_runs=args.big_runs)
    settle_database(url, timeout=600)
    size = database_size(url)
    print(f"built in {time.perf_counter() - started:,.0f} s; database {size / 2**30:.2f} GiB")

    if not args.no_reads:
        reads = measure_reads(url, big, days=args.days, seconds=args.seconds)
        print(f"\nreads at {RATE:g} requests/s each, {args.seconds:g} s each, PostgreSQL\n")
        table(
            ["read", "p50 ms", "p99 ms", "p99 <= 50 ms"],
            [
                (kind, f"{p50:.1f}", f"{p99:.1f}", "met" if p99 <= TARGET_P99_MS else "MISSED")
                for kind, p50, p99 in reads
            ],
        )

    result = measure_retention(
        url, days=args.days, keep_days=args.keep_days, window=args.window, rest=args.rest
    )
    ratio = result["beside"] / result["alone"] if result["alone"] else float("nan")
    print(
        f"\nretention alone: {result['alone_runs']:,} runs"
        f" = {result['alone_per_minute']:,.0f} runs/min"
    )
    print(
        f"retention beside the worker, resting {args.rest:g}x each transaction's time:"
        f" {result['deleted']:,} runs (all left older than"
        f" {args.keep_days:g} days) in {result['retention_s']:.1f} s"
        f" = {result['per_minute']:,.0f} runs/min"
        f" (target >= 1,000,000: {'met' if result['per_minute'] >= 1e6 else 'MISSED'})"
    )
    print(
        f"worker: {result['alone']:.0f} runs/s alone, {result['beside']:.0f} runs/s beside"
        f" retention = {ratio:.2f}x (target >= 0.9x: {'met' if ratio >= 0.9 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
