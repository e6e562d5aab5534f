"""Real Flower (`celery -A worker.celery_app flower`) beside a real conveyor worker: through
Flower's own REST API, the worker is listed and each run shows up as a `conveyor.execute` task
whose id and only argument are the run id, with its received, started and succeeded or failed
events.

What Flower shows, and why: conveyor publishes messages itself and task-sent events are off,
so Flower learns of a task from the worker's task-received event (its `sent` stays empty). A
run that fails in conveyor's terms is still a Celery task that *succeeded*: the executor records
the failure in the database and the task returns the run's final status (`'failed'`). Flower
shows FAILURE only when the Celery task itself fails: e.g. a run whose code ignores its timeout,
whose worker process conveyor ends (WorkerLostError)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.e2e.stack import ROOT, Stack
from tests.http_receiver import free_port
from tests.polling import eventually
from tests.services import PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

REDIS_DB = 14
AUTH = ("flower", "test-only-password")


class Flower:
    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", auth=AUTH, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def stack(pg_url: str, redis_server: PrivateRedis, tmp_path: Path) -> Iterator[Stack]:
    broker = redis_server.url(REDIS_DB)
    redis.Redis.from_url(broker).flushdb()
    s = Stack(pg_url, tmp_path, broker)
    s.worker("default", name="flowerw", concurrency=2)
    try:
        yield s
    finally:
        s.stop_all()


@pytest.fixture
def flower(stack: Stack, tmp_path: Path) -> Iterator[Flower]:
    port = free_port()
    env = {**stack.env, "FLOWER_BASIC_AUTH": ":".join(AUTH)}
    log = tmp_path / "flower.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower"),
                *(f"--port={port}", "--address=127.0.0.1"),
            ],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    f = Flower(f"http://127.0.0.1:{port}", log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flower exited: {log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{f.url}/healthcheck", timeout=2).text == "OK"
        except httpx.TransportError:
            return False

    try:
        eventually(up, timeout=60)
        yield f
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_flower_shows_conveyor_workers_tasks_and_events(stack: Stack, flower: Flower) -> None:
    def worker_listed() -> bool:
        return any(name.startswith("flowerw@") for name in flower.get("/api/workers?refresh=1"))

    eventually(worker_listed, timeout=60, every=0.5)
    [name] = [n for n in flower.get("/api/workers?refresh=1") if n.startswith("flowerw@")]
    assert flower.get("/api/workers?status=1")[name] is True  # alive, from its heartbeats

    with stack.client() as client:
        ok = client.enqueue("noop", {"i": 1}).id
        failed = client.enqueue("raises_unpicklable").id
        stuck = client.enqueue("stuck").id  # ignores its 1 s timeout: its process is ended
        runs = {ok: "SUCCESS", failed: "SUCCESS", stuck: "FAILURE"}

        def all_seen_finished() -> bool:
            tasks = flower.get("/api/tasks?taskname=conveyor.execute")
            return all(tasks.get(str(run), {}).get("state") == s for run, s in runs.items())

        eventually(all_seen_finished, timeout=90, every=0.5)
        statuses = {run: client.get(run).status for run in runs}
    assert statuses == {ok: "succeeded", failed: "failed", stuck: "timed_out"}

    tasks = flower.get("/api/tasks?taskname=conveyor.execute")
    for run in runs:
        info = flower.get(f"/api/task/info/{run}")
        assert info["uuid"] == str(run) == tasks[str(run)]["uuid"]
        assert info["name"] == "conveyor.execute"
        assert info["args"] == repr([str(run)])  # the run id is the task's only argument
        assert info["worker"] == name
        assert info["received"] and info["started"], info  # task-received, task-started
        assert info["sent"] is None  # conveyor publishes itself; no task-sent event
    assert flower.get(f"/api/task/info/{ok}")["result"] == "'succeeded'"
    assert flower.get(f"/api/task/info/{ok}")["succeeded"]
    # A failed run is a Celery task that succeeded: it returned the run's final status.
    assert flower.get(f"/api/task/info/{failed}")["result"] == "'failed'"
    # The Celery task itself fails only when its process is ended under it.
    lost = flower.get(f"/api/task/info/{stuck}")
    assert lost["failed"] and lost["succeeded"] is None, lost
    assert "WorkerLostError: Worker exited prematurely: signal 9" in lost["traceback"], lost

    stats = flower.get(f"/api/workers?refresh=1&workername={name}")[name]["stats"]
    assert stats["total"]["conveyor.execute"] == 3
    assert uuid.UUID(str(ok))
