"""Status API under load: read latency at a steady 200 requests/s and webhook intake, from a
second process, against a real `conveyor api` (uvicorn) while a worker executes a steady
~200 runs/s. The in-run floor is `/healthz` on the same server at the same rate.

Method (what makes the figures honest):
- the server is warmed up first with one second of the reads (not measured): its first
  requests open the database connections a server in service already has;
- the load comes from a second process, open loop: request n leaves at start + n/rate whatever
  the earlier answers, so a slow server is measured, not waited for;
- reads alternate the runs list (first page, default size) and the detail of runs that have
  steps, log lines and cost entries; each is reported on its own and both together;
- the runs to read are seeded as finished runs (without the broker), so the worker starts
  idle; then a feeder submits --task-rate runs/s, paced on a clock, for the whole
  measurement; the runs the worker finished in each phase are counted from the database and
  printed, so "while workers run 200 tasks/s" is a measured fact rather than an assumption;
- webhooks: --concurrency senders, each a new signed delivery after the previous answer;
  accepted = 202s per second. By default the worker also executes every run they create (on
  top of the feeder's); `--park-hook-runs` sends them to a queue it does not consume, so the
  worker runs the feeder's rate only, as the issue's condition states;
- the load generator shares the 2 cores with what it measures, so by default it uses a
  minimal HTTP/1.1 client (bench/http1.py) instead of httpx, which cost as much CPU per
  request as the API itself; `--client httpx` measures with httpx.

Targets (issue 7): p99 <= 50 ms for reads at 200 requests/s, >= 500 accepted webhooks/s.
Run: `python -m bench.api [--seconds 10] [--rate 200] [--task-rate 200] [--concurrency 16]
[--park-hook-runs]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import psutil
from sqlalchemy import Engine, func, insert, select

from bench.common import (
    Disturbed,
    Processes,
    RedisGuard,
    conveyor_env,
    conveyor_worker_argv,
    flush_redis,
    fresh_database,
    percentile,
    pg_backends,
    process_tree,
    wait_for,
)
from bench.http1 import Pool, TransportError

LIST = "/api/v1/runs"
PHASE = "phase:"
DETAIL_RUNS = 50
WARMUP_S = 1.0


class _Httpx:
    """httpx behind the Pool's interface (--client httpx), to compare with the light one."""

    def __init__(self, port: int, size: int) -> None:
        limits = httpx.Limits(max_connections=size)
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30
        )

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> int:
        try:
            reply = await self.http.request(method, path, headers=headers, content=body)
        except httpx.HTTPError as exc:
            raise OSError(str(exc)) from exc
        return reply.status_code

    async def aclose(self) -> None:
        await self.http.aclose()


def _client(kind: str, port: int, size: int) -> Pool | _Httpx:
    return Pool("127.0.0.1", port, size) if kind == "raw" else _Httpx(port, size)


async def _steady(
    args: argparse.Namespace, paths: list[str], rate: float, seconds: float
) -> dict[str, list[float]]:
    """Open loop: one request every 1/rate s whatever the answers; latencies in ms by path
    kind ("detail" for a run's detail), failures counted under "errors" (a failed request has
    no latency to report, and must not vanish either)."""
    latencies: dict[str, list[float]] = {"errors": []}
    headers = {"Authorization": f"Bearer {args.token}"}
    http = _client(args.client, int(args.port), 64)

    async def one(path: str) -> None:
        started = time.perf_counter()  # the request's due time: client queueing counts
        try:
            status = await http.request("GET", path, headers)
        except TransportError:
            status = 0
        if not 200 <= status < 300:
            latencies["errors"].append(time.perf_counter() - started)
            return
        kind = "detail" if path.startswith(LIST + "/") else path
        latencies.setdefault(kind, []).append((time.perf_counter() - started) * 1000)

    tasks = []
    start = time.perf_counter()
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(paths[n % len(paths)])))
    await asyncio.gather(*tasks)
    await http.aclose()
    return latencies


async def _webhooks(args: argparse.Namespace) -> tuple[int, float]:
    """--concurrency senders, each sending a new signed delivery once it has its answer."""
    from domain.webhooks.inbound import signature

    accepted = 0
    counter = iter(range(10**9))
    deadline = time.perf_counter() + args.seconds
    http = _client(args.client, int(args.port), args.concurrency)

    async def sender() -> None:
        nonlocal accepted
        while time.perf_counter() < deadline:
            n = next(counter)
            body = json.dumps({"i": n}).encode()
            stamp = str(int(time.time()))
            headers = {
                "X-Conveyor-Signature": signature(args.secret, stamp, body),
                "X-Conveyor-Timestamp": stamp,
                "X-Conveyor-Delivery": f"d-{n}",
                "Content-Type": "application/json",
            }
            with contextlib.suppress(*TransportError):
                if await http.request("POST", "/hooks/bench", headers, body) == 202:
                    accepted += 1

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(args.concurrency)))
    spent = time.perf_counter() - started
    await http.aclose()
    return accepted, spent


def load(args: argparse.Namespace) -> None:
    """The second process: prints its measurements (and each phase's wall-clock window, for
    counting the worker's runs in it) as one JSON line."""
    paths: list[str] = []
    for run_id in args.run_ids.split(","):
        paths += [LIST, f"{LIST}/{run_id}"]
    out: dict[str, Any] = {}

    def phase(name: str) -> float:  # tells the parent, which reads CPU counters at each
        print(f"{PHASE}{name}", flush=True)
        return time.time()

    # Not measured: one second of the same reads first, as a server in service has had. The
    # API opens its read connections and prepares its statements on first use, and the
    # first 200 ms of a cold start (about 15 requests over 50 ms) would otherwise be the
    # reads' p99 by themselves.
    asyncio.run(_steady(args, paths, args.rate, WARMUP_S))
    window = phase("floor")
    out["floor"] = asyncio.run(_steady(args, ["/healthz"], args.rate, args.seconds))
    out["floor_window"], window = (window, time.time()), phase("reads")
    out["reads"] = asyncio.run(_steady(args, paths, args.rate, args.seconds))
    out["reads_window"], window = (window, time.time()), phase("webhooks")
    out["accepted"], out["spent"] = asyncio.run(_webhooks(args))
    out["webhooks_window"] = (window, phase("end"))
    print(json.dumps(out))


class CpuByPhase:
    """CPU seconds each group of processes used in each phase, and the whole machine's (the
    difference is everyone else on it: other benchmarks, test suites)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.loader_pid = 0
        self.marks: list[tuple[str, float, dict[str, dict[int, float]], float]] = []

    def mark(self, phase: str) -> None:
        readings: dict[str, dict[int, float]] = {}
        for group, pids in self.groups.items():
            readings[group] = {}
            for pid in pids():
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    t = psutil.Process(pid).cpu_times()
                    readings[group][pid] = t.user + t.system
        machine = psutil.cpu_times()
        self.marks.append((phase, time.time(), readings, machine.user + machine.system))

    def cores(self) -> dict[str, dict[str, float]]:
        """Per phase: average cores used by each group, by all of them, and by the machine."""
        out: dict[str, dict[str, float]] = {}
        for (phase, t0, before, m0), (_, t1, after, m1) in itertools.pairwise(self.marks):
            spent = t1 - t0
            row = {
                group: sum(v - before[group].get(pid, 0.0) for pid, v in after[group].items())
                / spent
                for group in self.groups
            }
            row["all of these"] = sum(row.values())
            row["machine"] = (m1 - m0) / spent
            out[phase] = row
        return out


def add_records(engine: Engine, run_ids: list[uuid.UUID]) -> None:
    """What a real run leaves for its detail page: three steps, 200 log lines, two costs."""
    from domain.db.models import cost_entries, run_logs, run_steps

    now = datetime.now(UTC)
    steps, lines, costs = [], [], []
    for rid in run_ids:
        steps += [
            {"run_id": rid, "seq": s, "attempt": 1, "name": f"step{s}", "status": "completed"}
            for s in (1, 2, 3)
        ]
        lines += [
            {
                "run_id": rid,
                "seq": 1000 + s,  # the noop task's own line keeps its low seq
                "attempt": 1,
                "ts": now,
                "stream": "log",
                "level": "info",
                "message": f"line {s}",
                "fields": {"n": s},
            }
            for s in range(200)
        ]
        costs += [
            {
                "run_id": rid,
                "seq": seq,
                "project": "default",
                "ts": now,
                "provider": "openai",
                "model": model,
                "tokens_in": 900,
                "tokens_out": 80,
                "requests": 1,
                "cost_usd": "0.00019",
            }
            for seq, model in enumerate(("gpt-4o-mini", "gpt-4o"), 1)
        ]
    with engine.begin() as conn:
        conn.execute(insert(run_steps), steps)
        conn.execute(insert(run_logs), lines)
        conn.execute(insert(cost_entries), costs)


def seed(url: str, n: int) -> list[uuid.UUID]:
    """`n` finished runs for the list and detail pages to show, recorded without the broker:
    the worker starts idle, and the feeder alone sets its pace."""
    from conveyor import Client
    from domain.db.models import runs
    from domain.settings import load_settings

    quiet = Client(load_settings(database_url=url, broker_url="memory://"))
    seeded = [
        r.id
        for r in quiet.enqueue_many({"name": "bench_noop", "params": {"i": i}} for i in range(n))
    ]
    with quiet.engine.begin() as conn:
        conn.execute(
            runs.update()
            .where(runs.c.id.in_(seeded))
            .values(
                status="succeeded", attempt=1, started_at=runs.c.created_at, finished_at=func.now()
            )
        )
    quiet.close()
    return seeded


def finished_between(engine: Engine, window: tuple[float, float]) -> int:
    from domain.db.models import runs

    start, end = (datetime.fromtimestamp(t, UTC) for t in window)
    with engine.connect() as conn:
        query = select(func.count()).where(runs.c.finished_at >= start, runs.c.finished_at < end)
        return int(conn.execute(query.select_from(runs)).scalar_one())


class Feeder:
    """`rate` runs/s for the worker while the block runs, paced on a clock (a late batch
    catches up rather than lowering the rate)."""

    BATCH = 10

    def __init__(self, client: Any, rate: float) -> None:
        self.client, self.rate = client, rate
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._feed, daemon=True)

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _feed(self) -> None:
        sent, start = 0, time.perf_counter()
        while not self.stop.is_set():
            due = int((time.perf_counter() - start) * self.rate)
            if due - sent >= self.BATCH:
                self.client.enqueue_many(
                    {"name": "bench_noop", "params": {"i": sent + i}} for i in range(due - sent)
                )
                sent = due
            self.stop.wait(self.BATCH / self.rate / 2)


def run_load(argv: list[str], cpu: CpuByPhase) -> dict[str, Any]:
    """Start the load process, read CPU counters at each phase it announces, return its
    measurements."""
    loader = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cpu.loader_pid = loader.pid
    lines = []
    assert loader.stdout is not None and loader.stderr is not None
    for line in loader.stdout:
        if line.startswith(PHASE):
            cpu.mark(line.removeprefix(PHASE).strip())
        else:
            lines.append(line)
    stderr = loader.stderr.read()
    if loader.wait() != 0:
        sys.exit(f"the load process failed:\n{stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=200, help="read requests per second")
    parser.add_argument("--task-rate", type=float, default=200, help="runs/s fed to the worker")
    parser.add_argument("--concurrency", type=int, default=16, help="webhook senders")
    parser.add_argument(
        "--api-workers",
        type=int,
        default=1,
        help="API processes: 1 is `conveyor api`; more run uvicorn --workers on api.asgi",
    )
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="the load generator's HTTP client (raw: bench/http1.py, a fraction of httpx's CPU)",
    )
    parser.add_argument(
        "--park-hook-runs",
        action="store_true",
        help="webhooks target a task on a queue the worker does not consume, so the worker "
        "keeps running the feeder's --task-rate alone (by default it also runs every run the "
        "webhooks create)",
    )
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--port", "--token", "--secret", "--run-ids"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.load:
        load(args)
        return

    from cryptography.fernet import Fernet

    from conveyor import Client
    from domain.db.unit_of_work import UnitOfWork
    from domain.logging import configure_logging
    from domain.security import tokens as auth
    from domain.settings import load_settings
    from domain.webhooks import inbound as webhooks

    configure_logging(level="WARNING")
    url = fresh_database("conveyor_bench_api")
    flush_redis()
    key = Fernet.generate_key().decode()
    env = conveyor_env(url, CONVEYOR_SECRET_KEY=key)
    settings = load_settings(
        database_url=url,
        broker_url=env["CONVEYOR_BROKER_URL"],
        task_modules="bench.tasks",
        secret_key=key,
    )
    client = Client(settings)
    _, token = auth.create_token(UnitOfWork(client.engine), "bench", "admin", actor="bench")
    _, secret = webhooks.add_webhook(
        UnitOfWork(client.engine),
        "bench",
        target="bench_parked" if args.park_hook_runs else "bench_noop",
        secret_key=key,
        actor="bench",
    )
    seeded = seed(url, 2000)
    detail_ids = seeded[:DETAIL_RUNS]
    add_records(client.engine, detail_ids)
    port = _free_port()
    with Processes() as procs:
        worker = procs.start(conveyor_worker_argv("api-bench", 2), env, "api-bench-worker")
        api = procs.start(api_argv(args.api_workers, port), env, "api-bench-api")
        wait_for(lambda: _ready(port), timeout=30, what="the API to answer /readyz")
        guard = RedisGuard()
        guard.arm()
        argv = [sys.executable, "-m", "bench.api", "--load", "--port", str(port)]
        argv += ["--token", token, "--secret", secret, "--concurrency", str(args.concurrency)]
        argv += ["--run-ids", ",".join(str(r) for r in detail_ids)]
        argv += ["--seconds", str(args.seconds), "--rate", str(args.rate), "--client", args.client]
        cpu = CpuByPhase(
            {
                "api (uvicorn)": lambda: process_tree(api.pid),
                "worker (+ pool)": lambda: process_tree(worker.pid),
                "postgres backends": lambda: pg_backends("conveyor_bench_api"),
                "load generator": lambda: [cpu.loader_pid],
                "feeder (this process)": lambda: [os.getpid()],
            }
        )
        with Feeder(client, args.task_rate):
            result = run_load(argv, cpu)
        done = {
            phase: finished_between(client.engine, result[f"{phase}_window"])
            / (result[f"{phase}_window"][1] - result[f"{phase}_window"][0])
            for phase in ("floor", "reads", "webhooks")
        }
        try:
            guard.check()
        except Disturbed as exc:  # a FLUSHALL beside us lost the worker's messages
            result["void"] = f"VOID ROUND, measure again: {exc} (the worker had less to do)"
    client.close()
    report(args, result, done, cpu.cores())


def report(
    args: argparse.Namespace,
    result: dict[str, Any],
    done: dict[str, float],
    cores: dict[str, dict[str, float]],
) -> None:
    floor, reads = result["floor"]["/healthz"], result["reads"]
    both = reads[LIST] + reads["detail"]
    rate = result["accepted"] / result["spent"]
    print(
        f"\napi: {args.rate:g} requests/s for {args.seconds:g} s each, from a second process, "
        f"while a worker (prefork -c 2) is fed {args.task_rate:g} runs/s; load client: "
        f"{args.client}; API processes: {args.api_workers}; this machine\n"
    )
    print(f"{'what':<36} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'worker runs/s':>14}")
    for label, values, phase in (
        ("/healthz (the server's floor)", floor, "floor"),
        ("runs list (first page)", reads[LIST], "reads"),
        ("run detail", reads["detail"], "reads"),
        ("reads, both", both, "reads"),
    ):
        print(
            f"{label:<36} {percentile(values, 50):>7.1f} {percentile(values, 99):>7.1f} "
            f"{max(values):>7.1f} {done[phase]:>14,.0f}"
        )
    errors = len(result["floor"]["errors"]) + len(reads["errors"])
    if errors:
        print(f"failed requests (not in the figures above): {errors}")
    phases = ("floor", "reads", "webhooks")
    print(f"\n{'CPU used, in cores (2 on this machine)':<36}" + "".join(f"{p:>10}" for p in phases))
    for group in next(iter(cores.values())):
        print(f"{group:<36}" + "".join(f"{cores[p][group]:>10.2f}" for p in phases))
    requests = {"floor": len(floor), "reads": len(both), "webhooks": result["accepted"]}
    per_request = {
        p: cores[p]["api (uvicorn)"] * _seconds(result[f"{p}_window"]) / max(1, requests[p])
        for p in phases
    }
    print(
        f"{'api CPU per request, ms':<36}"
        + "".join(f"{per_request[p] * 1000:>10.2f}" for p in phases)
    )
    if "void" in result:
        print(result["void"])
    p99 = percentile(both, 99)
    met = p99 <= 50 and not errors
    print(f"\nreads p99 {p99:.1f} ms (target <= 50 ms): {'met' if met else 'MISSED'}")
    parked = " (their runs parked on a queue no worker consumes)" if args.park_hook_runs else ""
    print(
        f"webhooks: {result['accepted']} accepted in {result['spent']:.1f} s = {rate:,.0f}/s "
        f"with {args.concurrency} senders{parked}, worker {done['webhooks']:,.0f} runs/s "
        f"(target >= 500/s): {'met' if rate >= 500 else 'MISSED'}"
    )


def _seconds(window: list[float]) -> float:
    return window[1] - window[0]


def api_argv(workers: int, port: int) -> list[str]:
    if workers == 1:
        return ["-m", "conveyor", "api", "--port", str(port)]
    return [
        "-m", "uvicorn", "--factory", "api.asgi:create_app", "--port", str(port),
        "--workers", str(workers), "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
