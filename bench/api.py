"""Status API under load: read latency at a steady 200 requests/s and webhook intake, from a
second process, against a real `conveyor api` (uvicorn) while a worker executes about 200
runs/s. The in-run floor is `/healthz` on the same server at the same rate.

Targets (issue 7): p99 <= 50 ms for reads at 200 requests/s, >= 500 accepted webhooks/s.
Run: `python -m bench.api [--seconds 10] [--rate 200] [--concurrency 16]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

from bench.common import (
    Processes,
    conveyor_env,
    conveyor_worker_argv,
    flush_redis,
    fresh_database,
    percentile,
    wait_for,
)


async def _steady(
    base: str, token: str, paths: list[str], rate: float, seconds: float
) -> list[float]:
    """Open loop: one request every 1/rate s whatever the answers, latencies in ms."""
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=10) as http:

        async def one(path: str) -> None:
            started = time.perf_counter()
            reply = await http.get(path)
            reply.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)

        tasks = []
        start = time.perf_counter()
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(paths[n % len(paths)])))
        await asyncio.gather(*tasks)
    return latencies


async def _webhooks(base: str, secret: str, seconds: float, concurrency: int) -> tuple[int, float]:
    from domain.webhooks import signature

    accepted = 0
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:

        async def sender() -> None:
            nonlocal accepted
            while time.perf_counter() < deadline:
                n = next(counter)
                body = json.dumps({"i": n}).encode()
                stamp = str(int(time.time()))
                reply = await http.post(
                    "/hooks/bench",
                    content=body,
                    headers={
                        "X-Conveyor-Signature": signature(secret, stamp, body),
                        "X-Conveyor-Timestamp": stamp,
                        "X-Conveyor-Delivery": f"d-{n}",
                        "Content-Type": "application/json",
                    },
                )
                if reply.status_code == 202:
                    accepted += 1

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return accepted, time.perf_counter() - started


def load(args: argparse.Namespace) -> None:
    """The second process: prints its measurements as one JSON line."""
    base = f"http://127.0.0.1:{args.port}"
    paths = ["/api/v1/runs?limit=20", *[f"/api/v1/runs/{r}" for r in args.run_ids.split(",")]]
    floor = asyncio.run(_steady(base, args.token, ["/healthz"], args.rate, args.seconds))
    reads = asyncio.run(_steady(base, args.token, paths, args.rate, args.seconds))
    accepted, spent = asyncio.run(_webhooks(base, args.secret, args.seconds, args.concurrency))
    print(json.dumps({"floor": floor, "reads": reads, "accepted": accepted, "spent": spent}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=200, help="read requests per second")
    parser.add_argument("--concurrency", type=int, default=16, help="webhook senders")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--port", "--token", "--secret", "--run-ids"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        load(args)
        return

    from cryptography.fernet import Fernet

    from conveyor import Client
    from domain import auth, webhooks
    from domain.settings import load_settings
    from domain.unit_of_work import UnitOfWork

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
        UnitOfWork(client.engine), "bench", target="bench_noop", secret_key=key, actor="bench"
    )
    seeded = client.enqueue_many({"name": "bench_noop", "params": {"i": i}} for i in range(2000))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Processes() as procs:
        procs.start(conveyor_worker_argv("api-bench", 2), env, "api-bench-worker")
        procs.start(["-m", "conveyor", "api", "--port", str(port)], env, "api-bench-api")
        wait_for(lambda: _ready(port), timeout=30, what="the API to answer /readyz")
        stop = threading.Event()

        def feed() -> None:  # ~200 runs/s for the workers while the API is measured
            n = 0
            while not stop.is_set():
                client.enqueue_many(
                    {"name": "bench_noop", "params": {"i": n + i}} for i in range(20)
                )
                n += 20
                stop.wait(0.1)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        ids = ",".join(str(r.id) for r in seeded[:50])
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.api",
                "--load",
                "--port",
                str(port),
                "--token",
                token,
                "--secret",
                secret,
                "--run-ids",
                ids,
                "--seconds",
                str(args.seconds),
                "--rate",
                str(args.rate),
                "--concurrency",
                str(args.concurrency),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        stop.set()
        feeder.join()
    client.close()
    report(args, json.loads(out.stdout.strip().splitlines()[-1]))


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    floor, reads = result["floor"], result["reads"]
    rate = result["accepted"] / result["spent"]
    print(
        f"\napi: {args.rate:g} requests/s for {args.seconds:g} s each, from a second process, "
        "while a worker (prefork -c 2) runs ~200 runs/s; this machine\n"
    )
    print(f"{'what':<44} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for label, values in (
        ("/healthz (the server's floor)", floor),
        ("runs list and run detail", reads),
    ):
        print(
            f"{label:<44} {percentile(values, 50):>7.1f} {percentile(values, 99):>7.1f} "
            f"{max(values):>7.1f}"
        )
    p99 = percentile(reads, 99)
    print(f"\nreads p99 {p99:.1f} ms (target <= 50 ms): {'met' if p99 <= 50 else 'MISSED'}")
    print(
        f"webhooks: {result['accepted']} accepted in {result['spent']:.1f} s = {rate:,.0f}/s "
        f"with {args.concurrency} senders (target >= 500/s): "
        f"{'met' if rate >= 500 else 'MISSED'}"
    )


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
