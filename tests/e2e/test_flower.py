"""Real Flower (`celery -A worker.celery_app flower`, unchanged) beside a real conveyor worker:
through Flower's own REST API each run shows up as its task, in the state its run is in.

What Flower shows, and why: conveyor publishes messages itself and task-sent events are off,
so Flower learns of a task from the worker's task-received event (its `sent` stays empty). The
message names the run's task in Celery's `shadow` header and shows the run id and its params
(secrets masked) as `argsrepr`/`kwargsrepr` (worker/messages.py), so Flower's task list, the
worker's stats and its log lines say `noop`, not `conveyor.execute`. The task ends as its run did
(worker/task_states.py): SUCCESS only for a run that succeeded, FAILURE with the error type and
message (`RunFailed`) for failed, timed_out and budget_exceeded runs, RETRY while conveyor's
next attempt waits in the database (no second Celery message: the relay publishes it). With
`--persistent=True --db=...`, as docker-compose.yml runs it, the history survives a restart.
Flower's REST API answers 401 without the basic auth (FLOWER_BASIC_AUTH)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
TOKEN = "tok-e2e-0123456789"


class Flower:
    """One Flower process; `restart()` stops it (it saves its state) and starts it again."""

    def __init__(self, stack: Stack, logs: Path) -> None:
        self.env = {**stack.env, "FLOWER_BASIC_AUTH": ":".join(AUTH)}
        self.logs, self.db = logs, logs / "flower.db"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.logs / "flower.log").open("ab") as sink:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower"),
                    *(f"--port={self.url.rsplit(':', 1)[1]}", "--address=127.0.0.1"),
                    *("--persistent=True", f"--db={self.db}"),
                ],
                cwd=ROOT,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        eventually(self._up, timeout=60)

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.logs / "flower.log").read_text()[-2000:]
            raise AssertionError(f"flower exited: {log}")
        try:
            return httpx.get(f"{self.url}/healthcheck", timeout=2).text == "OK"
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # Flower saves its state on SIGTERM
            self.proc.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", auth=AUTH, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def state(self, run: object) -> str | None:
        tasks = self.get("/api/tasks")
        state: str | None = tasks.get(str(run), {}).get("state")
        return state


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
    f = Flower(stack, tmp_path)
    f.start()
    try:
        yield f
    finally:
        f.stop()


def test_flower_shows_each_run_as_its_task_in_the_state_of_its_run(
    stack: Stack, flower: Flower
) -> None:
    def worker_listed() -> bool:
        return any(name.startswith("flowerw@") for name in flower.get("/api/workers?refresh=1"))

    eventually(worker_listed, timeout=60, every=0.5)
    [name] = [n for n in flower.get("/api/workers?refresh=1") if n.startswith("flowerw@")]
    assert flower.get("/api/workers?status=1")[name] is True  # alive, from its heartbeats
    assert httpx.get(f"{flower.url}/api/workers", timeout=10).status_code == 401  # no auth

    with stack.client() as client:
        ok = client.enqueue("signs_in", {"user": "ada", "api_token": TOKEN}).id
        failed = client.enqueue("raises_unpicklable").id
        timed_out = client.enqueue("waits", {"seconds": 30}, timeout=1).id
        # No scheduler yet: the retry conveyor scheduled waits in the database, unpublished.
        retrying = client.enqueue("always_fails").id
        expected = {ok: "SUCCESS", failed: "FAILURE", timed_out: "FAILURE", retrying: "RETRY"}

        eventually(
            lambda: {run: flower.state(run) for run in expected} == expected, timeout=60, every=0.5
        )
        statuses = {run: client.get(run).status for run in expected}
        assert statuses == {
            ok: "succeeded",
            failed: "failed",
            timed_out: "timed_out",
            retrying: "pending",  # its next attempt is due: only the relay publishes it
        }
        # Celery's own retry would have published a second message: conveyor's did not.
        assert stack.redis.llen("default") == 0

        info = {run: flower.get(f"/api/task/info/{run}") for run in expected}
        names = {ok: "signs_in", failed: "raises_unpicklable", timed_out: "waits"}
        for run, task_name in {**names, retrying: "always_fails"}.items():
            assert info[run]["uuid"] == str(run)
            assert info[run]["name"] == task_name  # the shadow name, not conveyor.execute
            assert info[run]["args"] == repr([str(run)])
            assert info[run]["worker"] == name
            assert info[run]["received"] and info[run]["started"], info[run]
            assert info[run]["sent"] is None  # conveyor publishes itself; no task-sent event
        assert info[ok]["kwargs"] == "{'user': 'ada', 'api_token': '***'}"
        assert TOKEN not in str(flower.get("/api/tasks")) + str(info)
        assert info[ok]["result"] == "'succeeded'" and info[ok]["succeeded"]
        assert info[failed]["exception"] == ("RunFailed('failed: Unpicklable: carries a lock')"), (
            info[failed]
        )
        assert info[timed_out]["exception"].startswith("RunFailed('timed_out: RunTimedOut: ")
        assert info[retrying]["exception"] == (
            "RunFailed('retrying: ValueError: failure on attempt 1')"
        ), info[retrying]

        # The scheduler's relay publishes attempts 2 and 3: the same task, FAILURE at the end.
        stack.scheduler()
        eventually(lambda: flower.state(retrying) == "FAILURE", timeout=60, every=0.5)
        assert client.get(retrying).status == "failed"
        last = flower.get(f"/api/task/info/{retrying}")
        assert last["name"] == "always_fails"
        assert last["exception"] == "RunFailed('failed: ValueError: failure on attempt 3')"

    stats = flower.get(f"/api/workers?refresh=1&workername={name}")[name]["stats"]
    assert stats["total"] == {
        "signs_in": 1,
        "raises_unpicklable": 1,
        "waits": 1,
        "always_fails": 3,
    }

    # --persistent: the task history outlives Flower's restart.
    before = flower.get("/api/tasks")
    flower.restart()
    after = flower.get("/api/tasks")
    assert {run: after[str(run)]["state"] for run in expected} == {
        **expected,
        retrying: "FAILURE",
    }
    assert {k: (v["name"], v["state"]) for k, v in after.items()} == {
        k: (v["name"], v["state"]) for k, v in before.items()
    }
