"""Keyed concurrency: what a key adds to a run's claim and finish, and how soon a freed slot
starts the next waiting run, each beside the same work without a key, in the same run.

- overhead: R runs of a no-op task with a concurrency key (never contended: the point is the
  gate's cost), against R runs of the same task without one; the executor in this process on
  PostgreSQL (claim, task, finish), p50 per run. Target: <= 0.3 ms added per run.
- hand-over: a real `conveyor worker -c 2` and `conveyor scheduler` on PostgreSQL and a private
  Redis; N runs of one key (max=1) enqueued at once, so each starts when the one before frees
  the slot: the gap from one's finished_at to the next one's started_at (the hand-over, the
  publish, the broker hop, the claim). Baseline: the same N runs without a key on a worker with
  one slot, where the gap is the worker's own turn between runs. Target: p99 <= 100 ms.

- acquire: `ctx.acquire` with room in the bucket, in a task on the in-process executor on
  PostgreSQL (one autocommit statement calling conveyor_rate_take, committed without waiting
  for the WAL flush), p50 per call. Beside it: the floor of any PostgreSQL round trip (SELECT
  1), the same take in a transaction with a synchronous commit (what the async commit saves),
  the take as separate statements (what SQLite runs; why the stored function), and the same
  61-bucket take kept in Redis, as a Lua script (the alternative we did not choose).
  Target: <= 0.5 ms p50.

Run: `python -m bench.limits [--runs 2000] [--chain 300] [--takes 3000]`.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

from sqlalchemy import create_engine, select

from bench.common import (
    Processes,
    close_executor,
    conveyor_env,
    conveyor_worker_argv,
    fresh_database,
    in_process_executor,
    percentile,
    table,
    wait_succeeded,
)
from conveyor import Client, Limit
from domain.clock import utc_now
from domain.db.engine import create_db_engine
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.logging import configure_logging
from domain.runs import enqueue
from domain.runs.requests import build_request
from domain.settings import load_settings
from domain.tasks.registry import Registry, RegistryCatalog
from worker import capture
from worker.logwriter import LogWriter


def overhead(url: str, n: int) -> tuple[float, float]:
    """p50 seconds per run (claim + task + finish) without and with a key."""
    engine = create_db_engine(url, pool_size=3, pre_ping=False)
    writer = LogWriter(engine)
    writer.start()
    capture.install()
    registry = Registry()

    @registry.task()
    def plain(ctx: Any, key: str) -> None:
        return None

    @registry.task(concurrency=Limit(key="{key}", max=1))
    def keyed(ctx: Any, key: str) -> None:
        return None

    executor = in_process_executor(engine, writer, registry)
    catalog = RegistryCatalog(registry)

    def timed(name: str) -> list[float]:
        requests = [build_request(name=name, params={"key": f"k{i % 50}"}) for i in range(n)]
        made = enqueue.enqueue_many(UnitOfWork(engine), requests, catalog=catalog)
        took = []
        for m in made:
            started = time.perf_counter()
            if executor.execute(m.run.id).status != "succeeded":
                raise SystemExit(f"{name} did not succeed")
            took.append(time.perf_counter() - started)
        return took

    timed("plain")  # warm: prepared statements, caches
    timed("keyed")
    without, with_key = [], []
    for _ in range(3):  # interleaved, so a slow minute of the machine hits both
        without += timed("plain")
        with_key += timed("keyed")
    close_executor(executor)
    writer.close()
    engine.dispose()
    return statistics.median(without), statistics.median(with_key)


#: The take of domain/flow/rates.py as Redis would keep it (for the comparison only): per
#: limit a hash of second -> requests and one of second -> tokens, summed over 61 seconds.
REDIS_TAKE = """
local t = redis.call('TIME')
local s = tonumber(t[1])
local req, tok = 0, 0
local rs = redis.call('HGETALL', KEYS[1])
for i = 1, #rs, 2 do
  if tonumber(rs[i]) > s - 61 then req = req + tonumber(rs[i + 1])
  else redis.call('HDEL', KEYS[1], rs[i]) end
end
local ts = redis.call('HGETALL', KEYS[2])
for i = 1, #ts, 2 do
  if tonumber(ts[i]) > s - 61 then tok = tok + tonumber(ts[i + 1])
  else redis.call('HDEL', KEYS[2], ts[i]) end
end
if req + tonumber(ARGV[1]) > tonumber(ARGV[3]) or tok + tonumber(ARGV[2]) > tonumber(ARGV[4])
then return 0 end
redis.call('HINCRBY', KEYS[1], s, ARGV[1])
redis.call('HINCRBY', KEYS[2], s, ARGV[2])
return 1
"""


REDIS_KEYS = ["bench:rate:r", "bench:rate:t"]


def _other_ways(engine: Any, client: Any) -> dict[str, Any]:
    """The takes ctx.acquire is compared with, each a function of no arguments."""
    from domain.db.driver import shared_connections
    from domain.flow import rates

    take_in_redis = client.register_script(REDIS_TAKE)

    connections = shared_connections(engine)

    def floor() -> None:  # the same connection and driver as ctx.acquire's take
        with connections.connection() as raw:
            raw.execute("SELECT 1", prepare=True).fetchone()

    def transaction() -> None:
        with engine.begin() as conn:
            rates.take(conn, "bench", requests=1, tokens=100)

    def statements() -> None:
        with engine.begin() as conn:
            rates._take_here(conn, "bench", 1, 100, None)

    def in_redis() -> None:
        take_in_redis(keys=REDIS_KEYS, args=[1, 100, 10**9, 10**15])

    return {
        "select 1": floor,
        "transaction": transaction,
        "statements": statements,
        "redis": in_redis,
    }


def acquiring(url: str, n: int) -> dict[str, list[float]]:
    """Seconds per take, by way: ctx.acquire, SELECT 1, statement by statement, Redis Lua."""
    import redis as redis_lib

    from bench.common import broker_url
    from domain.flow import rates

    engine = create_db_engine(url, pool_size=3, pre_ping=False)
    with engine.begin() as conn:
        limit = rates.RateLimit("bench", 10**9, 10**15)
        rates.save(conn, limit, defined_in="api", now=utc_now())
    writer = LogWriter(engine)
    writer.start()
    capture.install()
    registry = Registry()
    took: dict[str, list[float]] = {
        "acquire": [], "select 1": [], "transaction": [], "statements": [], "redis": []
    }  # fmt: skip

    @registry.task()
    def calls(ctx: Any, n: int) -> None:
        for _ in range(n):
            started = time.perf_counter()
            ctx.acquire("bench", tokens=100)
            took["acquire"].append(time.perf_counter() - started)

    executor = in_process_executor(engine, writer, registry)
    catalog = RegistryCatalog(registry)
    client = redis_lib.Redis.from_url(broker_url())
    ways = _other_ways(engine, client)
    for round_ in range(4):  # interleaved; the first round warms up and is dropped
        (made,) = enqueue.enqueue_many(
            UnitOfWork(engine), [build_request(name="calls", params={"n": n})], catalog=catalog
        )
        before = len(took["acquire"])
        if executor.execute(made.run.id).status != "succeeded":
            raise SystemExit("the acquiring task did not succeed")
        for name, way in ways.items():
            start = len(took[name])
            for _ in range(n):
                started = time.perf_counter()
                way()
                took[name].append(time.perf_counter() - started)
            if round_ == 0:
                del took[name][start:]
        if round_ == 0:
            del took["acquire"][before:]
    client.delete(*REDIS_KEYS)
    client.close()
    close_executor(executor)
    writer.close()
    engine.dispose()
    return took


def gaps(client: Client, url: str, name: str, queue: str, n: int) -> list[float]:
    made = [
        r.id
        for r in client.enqueue_many(
            {"name": name, "params": {"key": "one"}, "queue": queue} for _ in range(n)
        )
    ]
    wait_succeeded(url, made, timeout=n * 0.5 + 60, what=f"{n} {name} runs")
    engine = create_engine(url)
    with engine.connect() as conn:
        spans = conn.execute(
            select(runs.c.started_at, runs.c.finished_at)
            .where(runs.c.id.in_(made))
            .order_by(runs.c.started_at)
        ).all()
    engine.dispose()
    return [(b.started_at - a.finished_at).total_seconds() for a, b in itertools.pairwise(spans)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2000, help="runs per overhead measurement")
    parser.add_argument("--chain", type=int, default=300, help="runs of one key (hand-over)")
    parser.add_argument("--takes", type=int, default=3000, help="takes per way (acquire)")
    args = parser.parse_args()
    configure_logging("console", "WARNING")
    url = fresh_database("conveyor_bench_limits")
    takes = acquiring(url, args.takes)
    p50_without, p50_with = overhead(url, args.runs)
    env = conveyor_env(url)
    with Processes() as procs:
        procs.start(["-m", "conveyor", "scheduler"], env, "limits-scheduler")
        procs.start([*conveyor_worker_argv("keyed", 2), "-Q", "keyed"], env, "limits-keyed")
        procs.start([*conveyor_worker_argv("serial", 1), "-Q", "serial"], env, "limits-serial")
        settings = load_settings(
            database_url=url, broker_url=env["CONVEYOR_BROKER_URL"], task_modules="bench.tasks"
        )
        with Client(settings) as client:
            base = gaps(client, url, "bench_unkeyed", "serial", args.chain)
            keyed = gaps(client, url, "bench_keyed", "keyed", args.chain)

    added_ms = (p50_with - p50_without) * 1000
    print("\nlimits: keyed concurrency, PostgreSQL, this machine\n")
    table(
        ["what", "p50 ms", "p99 ms"],
        [
            ["a run without a key: claim + task + finish", f"{p50_without * 1000:.3f}", ""],
            ["the same run with a key", f"{p50_with * 1000:.3f}", ""],
            [
                "gap between runs, one slot, no key (baseline)",
                f"{percentile(base, 50) * 1000:.1f}",
                f"{percentile(base, 99) * 1000:.1f}",
            ],
            [
                "gap from a freed slot to the next run of its key",
                f"{percentile(keyed, 50) * 1000:.1f}",
                f"{percentile(keyed, 99) * 1000:.1f}",
            ],
        ],
    )
    print(f"\nratio (with key / without, per run): {p50_with / p50_without:.2f}x")
    ratio = percentile(keyed, 50) / percentile(base, 50)
    print(f"ratio (hand-over gap / one-slot gap, p50): {ratio:.2f}x")
    print(
        f"added per run: {added_ms:.3f} ms (target <= 0.3 ms): "
        f"{'met' if added_ms <= 0.3 else 'MISSED'}"
    )
    p99 = percentile(keyed, 99) * 1000
    print(f"hand-over p99: {p99:.1f} ms (target <= 100 ms): {'met' if p99 <= 100 else 'MISSED'}")

    print("\nlimits: one take of a rate limit with room, PostgreSQL and Redis, this machine\n")
    labels = {
        "acquire": "ctx.acquire (conveyor_rate_take, one statement, async commit)",
        "select 1": "SELECT 1, one statement (baseline: the floor of a round trip)",
        "transaction": "the same take in a transaction, synchronous commit",
        "statements": "the same take as separate statements (as on SQLite)",
        "redis": "the same take kept in Redis, a Lua script (not chosen)",
    }
    table(
        ["way", "p50 ms", "p99 ms"],
        [
            [labels[name], f"{percentile(v, 50) * 1000:.3f}", f"{percentile(v, 99) * 1000:.3f}"]
            for name, v in takes.items()
        ],
    )
    acquire_p50 = percentile(takes["acquire"], 50) * 1000
    floor_p50 = percentile(takes["select 1"], 50) * 1000
    print(f"\nratio (ctx.acquire / SELECT 1, p50): {acquire_p50 / floor_p50:.2f}x")
    redis_ratio = acquire_p50 / (percentile(takes["redis"], 50) * 1000)
    print(f"ratio (ctx.acquire / Redis Lua take, p50): {redis_ratio:.2f}x")
    print(
        f"ctx.acquire p50: {acquire_p50:.3f} ms (target <= 0.5 ms): "
        f"{'met' if acquire_p50 <= 0.5 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
