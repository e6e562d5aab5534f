"""Log throughput and visibility: one conveyor task writing N lines through a real worker.

The task (bench.tasks.bench_log_lines) calls `ctx.log` N times in a loop, each line starting with
the wall-clock time it was logged. It runs in a real `conveyor worker -c 1` (prefork: the task
in the pool child, its LogWriter flushing by COPY from a thread of that child), as deployed.

- lines/s: N / (run started_at -> finished_at), both from the runs row: from the claim until the
  final transaction that writes the last buffered lines with the final state has committed,
  so every line is in PostgreSQL. Target >= 100,000 lines/s.
- baseline: the same N rows (same columns, same kind of message) written by one raw psycopg
  COPY in one transaction, timed in the same run: the ceiling a writer could reach here.
- visibility: while the task runs, a watcher in this process finds every 10 ms how far the
  run's lines are visible (lines are committed in seq order, so that is a prefix 1..F: F from
  an index probe), and fetches line F through `Client.logs(run_id, after_seq=F-1, limit=1)`;
  lines up to F count as visible when that call returns. Per line, visible-at minus the time
  embedded in it is the latency. Target: every line within 1 s (p50, p99 and max printed).
  `--follow PAGE` adds a reader that pulls every line through `Client.logs` pages, as a UI
  tailing the run would; its figure includes its own reading speed on these shared 2 cores.

Run: `python -m bench.logs [--lines 1000000] [--rounds 3] [--follow 10000]`.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import create_engine, text

from bench.common import (
    Processes,
    RedisGuard,
    broker_url,
    conveyor_env,
    conveyor_worker_argv,
    flush_redis,
    fresh_database,
    libpq_dsn,
    percentile,
    table,
    wait_for,
)
from conveyor import Client
from domain.clock import utc_now
from domain.logging import configure_logging
from domain.settings import load_settings
from worker.logwriter import LOG_COLUMNS

TARGET_RATE = 100_000
TARGET_VISIBLE_S = 1.0
_LOG_TYPES = ["uuid", "int8", "int4", "timestamptz", "text", "text", "text", "jsonb"]


@dataclass
class Frontier:
    """Watches how far a run's lines are visible, every 10 ms, and when each line first was.

    Lines are committed in seq order (one batch in flight at a time), so what is visible is
    always lines 1..F. Each poll finds F with `SELECT max(seq)` (an index probe), then fetches
    line F through `Client.logs(run_id, after_seq=F-1, limit=1)`; the time that call returns is
    when lines (previous F, F] were first seen. Their logged times are read after the run.
    A reader that pulled every line through Client.logs would measure its own speed instead
    (see --follow).
    """

    client: Client
    engine: Any
    run_id: uuid.UUID
    expected: int
    marks: list[tuple[int, float]] = field(default_factory=list)  # (F, first seen at)
    error: BaseException | None = None

    def run(self, deadline: float) -> None:
        query = text("SELECT max(seq) FROM run_logs WHERE run_id = :id")
        seen = 0
        try:
            with self.engine.connect() as conn:
                while seen < self.expected and time.time() < deadline:
                    frontier = conn.execute(query, {"id": self.run_id}).scalar() or 0
                    conn.rollback()  # a fresh snapshot for the next poll
                    if frontier > seen:
                        line = self.client.logs(self.run_id, after_seq=frontier - 1, limit=1)
                        if not line or line[0].seq != frontier:
                            raise RuntimeError(f"line {frontier} not returned by Client.logs")
                        self.marks.append((frontier, time.time()))
                        seen = frontier
                    time.sleep(0.01)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def latencies(self) -> list[float]:
        """Per line: first seen minus the time embedded in it by the task."""
        logged = logged_times(self.engine, self.run_id)
        out, start = [], 0
        for frontier, at in self.marks:
            out += [at - t for t in logged[start:frontier]]
            start = frontier
        return out


@dataclass
class Follower:
    """--follow: a consumer tailing every line through Client.logs pages, as a UI would."""

    client: Client
    run_id: uuid.UUID
    expected: int
    page: int
    latencies: list[float] = field(default_factory=list)
    error: BaseException | None = None

    def run(self, deadline: float) -> None:
        after = 0
        try:
            while after < self.expected and time.time() < deadline:
                lines = self.client.logs(self.run_id, after_seq=after, limit=self.page)
                seen = time.time()
                self.latencies += [seen - float(x.message.split(" ", 1)[0]) for x in lines]
                if lines:
                    after = lines[-1].seq
                if len(lines) < self.page:
                    time.sleep(0.01)
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def logged_times(engine: Any, run_id: uuid.UUID) -> list[float]:
    """The wall-clock time each line of the run was logged (embedded by the task), by seq."""
    with engine.connect() as conn:
        messages = conn.execute(
            text("SELECT message FROM run_logs WHERE run_id = :id ORDER BY seq"), {"id": run_id}
        ).scalars()
        return [float(m.split(" ", 1)[0]) for m in messages]


def copy_baseline(url: str, client: Client, n: int) -> float:
    """Seconds for one raw psycopg COPY of n log rows like the task's, in one transaction."""
    run = client.enqueue("bench_log_lines", {"n": 0}, delay="1h")  # never due: no worker runs it
    now, ts = time.time(), utc_now()
    rows = [
        (run.id, seq, 1, ts, "log", "info", f"{now:.6f} line {seq - 1}", None)
        for seq in range(1, n + 1)
    ]
    with psycopg.connect(libpq_dsn(url)) as conn:
        started = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY run_logs ({', '.join(LOG_COLUMNS)}) FROM STDIN") as copy,
        ):
            copy.set_types(_LOG_TYPES)
            for row in rows:
                copy.write_row(row)
        conn.commit()
        seconds = time.perf_counter() - started
        conn.execute("DELETE FROM run_logs WHERE run_id = %s", [run.id])
        conn.commit()
    return seconds


@dataclass
class Round:
    seconds: float  # run started_at -> finished_at
    visible: list[float]  # per line: logged -> first seen
    followed: list[float]  # per line, --follow only: logged -> read by the follower


def conveyor_round(
    client: Client, engine: Any, n: int, timeout: float, follow_page: int = 0
) -> Round:
    """Enqueue the task and watch its lines while it writes."""
    run = client.enqueue("bench_log_lines", {"n": n})
    deadline = time.time() + timeout
    frontier = Frontier(client, engine, run.id, n)
    follower = Follower(client, run.id, n, follow_page)
    threads = [threading.Thread(target=frontier.run, args=(deadline,), daemon=True)]
    if follow_page:
        threads.append(threading.Thread(target=follower.run, args=(deadline,), daemon=True))
    for thread in threads:
        thread.start()

    def finished() -> bool:
        return client.get(run.id).status in {"succeeded", "failed", "timed_out", "cancelled"}

    wait_for(finished, timeout=timeout, every=0.1, what="bench_log_lines")
    for thread in threads:
        thread.join(timeout)
    for error in (frontier.error, follower.error):
        if error is not None:
            raise error
    with engine.connect() as conn:
        status, started_at, finished_at, stored = conn.execute(
            text(
                "SELECT status, started_at, finished_at, "
                "(SELECT count(*) FROM run_logs WHERE run_id = runs.id) FROM runs WHERE id = :id"
            ),
            {"id": run.id},
        ).one()
    visible = frontier.latencies()
    if status != "succeeded" or stored != n or len(visible) != n:
        raise SystemExit(
            f"run {run.id}: {status}, {stored} lines stored, {len(visible)} seen; expected {n}"
        )
    return Round((finished_at - started_at).total_seconds(), visible, follower.latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--lines", type=int, default=1_000_000, help="lines (the issue's 1,000,000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="best round counts for lines/s")
    parser.add_argument(
        "--follow",
        type=int,
        default=0,
        metavar="PAGE",
        help="also tail every line through Client.logs pages of PAGE lines, and report that",
    )
    parser.add_argument("--timeout", type=float, default=300, help="per-round limit, seconds")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    n = args.lines

    url = fresh_database("conveyor_bench_logs")
    flush_redis()
    settings = load_settings(database_url=url, broker_url=broker_url(), task_modules="bench.tasks")
    client = Client(settings)
    engine = create_engine(url, pool_size=1)
    guard = RedisGuard()
    copies: list[float] = []
    runs: list[Round] = []
    try:
        with Processes() as procs:
            procs.start(conveyor_worker_argv("bench-logs", 1), conveyor_env(url), "logs-worker")
            conveyor_round(client, engine, 1000, timeout=120)  # warm up
            for round_no in range(1, args.rounds + 1):
                copies.append(copy_baseline(url, client, n))
                guard.arm()
                procs.check_alive()
                runs.append(conveyor_round(client, engine, n, args.timeout, args.follow))
                guard.check()
                print(
                    f"round {round_no}: COPY {n / copies[-1]:,.0f} lines/s, conveyor "
                    f"{n / runs[-1].seconds:,.0f} lines/s, visible p99 "
                    f"{percentile(runs[-1].visible, 99) * 1000:,.0f} ms",
                    flush=True,
                )
    finally:
        client.close()
        engine.dispose()
        flush_redis()

    best = min(r.seconds for r in runs)
    copy_rate, rate = n / min(copies), n / best
    print(
        f"\nlogs: one task writing {n:,} lines through a real worker (prefork -c 1), "
        f"best of {args.rounds} rounds, this machine\n"
    )
    table(
        ["what", "lines/s", "seconds", "vs raw COPY"],
        [
            ["raw psycopg COPY, one transaction (baseline)", f"{copy_rate:,.0f}",
             f"{min(copies):.2f}", "1.00x"],
            ["conveyor ctx.log -> PostgreSQL (started->finished)", f"{rate:,.0f}",
             f"{best:.2f}", f"{rate / copy_rate:.2f}x"],
        ],
    )  # fmt: skip
    latencies = [x for r in runs for x in r.visible]
    p50, p99, worst = (percentile(latencies, p) for p in (50, 99, 100))
    print(
        f"\nvisible through Client.logs after ctx.log ({len(latencies):,} lines, all rounds): "
        f"p50 {p50 * 1000:,.0f} ms, p99 {p99 * 1000:,.0f} ms, max {worst * 1000:,.0f} ms"
    )
    if args.follow:
        followed = [x for r in runs for x in r.followed]
        print(
            f"read by a follower tailing every line (pages of {args.follow}): "
            + ", ".join(
                f"{name} {percentile(followed, p) * 1000:,.0f} ms"
                for name, p in (("p50", 50), ("p99", 99), ("max", 100))
            )
        )
    print(
        f"lines/s target >= {TARGET_RATE:,}: {'met' if rate >= TARGET_RATE else 'MISSED'}; "
        f"every line visible within {TARGET_VISIBLE_S:g} s: "
        f"{'met' if worst <= TARGET_VISIBLE_S else 'MISSED'} (p99 "
        f"{'met' if p99 <= TARGET_VISIBLE_S else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
