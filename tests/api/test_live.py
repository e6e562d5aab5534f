"""The API as deployed: `conveyor api` in its own process (uvicorn), tokens and webhooks made
with the CLI, live logs over SSE, signed webhooks over real HTTP, abuse over raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from domain.clock import utc_now
from domain.db.engine import create_db_engine
from domain.db.models import runs
from domain.tasks import catalog
from domain.tasks.registry import Registry
from domain.webhooks import inbound as webhooks
from tests.api.conftest import SECRET_KEY, add_logs, set_status
from tests.api.test_webhooks import signed_headers
from tests.e2e.stack import ROOT
from tests.polling import eventually

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@dataclass
class LiveApi:
    url: str
    engine: Engine
    env: dict[str, str]
    cwd: Path
    admin: str
    writer: str

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "conveyor", *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}

    def gauge(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
        raise AssertionError(f"{name} not in /metrics")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def live(pg_url: str, tmp_path: Path) -> Iterator[LiveApi]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        {
            "CONVEYOR_DATABASE_URL": pg_url,
            "CONVEYOR_BROKER_URL": "memory://",
            "CONVEYOR_SECRET_KEY": SECRET_KEY,
            "CONVEYOR_LOG_FORMAT": "json",
            "PYTHONPATH": str(ROOT),
        }
    )
    port = free_port()
    engine = create_db_engine(pg_url)
    publish_tasks(engine)
    api = LiveApi(f"http://127.0.0.1:{port}", engine, env, tmp_path, "", "")
    api.admin = json.loads(api.cli("tokens", "create", "ops", "--role", "admin", "--json"))["token"]
    api.writer = json.loads(api.cli("tokens", "create", "ci", "--role", "write", "--json"))["token"]
    log = tmp_path / "api.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "api", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        eventually(lambda: _healthy(api.url, proc), timeout=30)
        yield api
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=30)
        engine.dispose()
    output = log.read_text()
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert code in (0, -signal.SIGTERM), output[-3000:]
    assert "Application shutdown complete" in output
    assert "Traceback" not in output, output[-3000:]


def publish_tasks(engine: Engine) -> None:
    """What a worker with these tasks publishes when it starts: the API (which imports no task
    code) checks runs and webhook targets against it."""
    registry = Registry()

    @registry.task(name="report")
    def report(ctx: object) -> None: ...

    @registry.task(name="build")
    def build(ctx: object, ref: str) -> None: ...

    catalog.publish(engine, registry.specs(), owner="test-worker", now=utc_now())


def _healthy(url: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"conveyor api exited with {proc.returncode}")
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def create(api: LiveApi) -> str:
    response = httpx.post(
        f"{api.url}/api/v1/runs", json={"name": "report"}, headers=api.headers(api.writer)
    )
    assert response.status_code == 201, response.text
    run_id: str = response.json()["id"]
    return run_id


def read_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, object]]]:
    kind = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, json.loads(line.removeprefix("data: "))


def test_live_logs_follow_a_run_until_it_ends(live: LiveApi) -> None:
    run_id = create(live)
    set_status(live.engine, run_id, "running")
    add_logs(live.engine, run_id, range(1, 4))

    def worker() -> None:  # plays the worker: more lines, then the final ones with the state
        time.sleep(0.5)
        add_logs(live.engine, run_id, range(4, 8))
        time.sleep(0.5)
        add_logs(live.engine, run_id, range(8, 10))
        set_status(live.engine, run_id, "succeeded")

    thread = threading.Thread(target=worker)
    thread.start()
    url = f"{live.url}/api/v1/runs/{run_id}/logs/stream"
    with httpx.stream("GET", url, headers=live.headers(), timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(response))
    thread.join()
    assert [data["seq"] for kind, data in events if kind == "log"] == list(range(1, 10))
    assert events[-1] == ("end", {"status": "succeeded", "last_seq": 9})

    resumed = httpx.get(url, headers={**live.headers(), "Last-Event-ID": "7"}, timeout=30)
    seqs = [json.loads(line[6:])["seq"] for line in resumed.text.splitlines() if '"seq"' in line]
    assert seqs == [8, 9] and "event: end" in resumed.text


def test_a_client_that_disconnects_mid_stream_leaves_nothing_behind(live: LiveApi) -> None:
    run_id = create(live)  # stays pending: its stream would never end by itself
    add_logs(live.engine, run_id, range(1, 3))
    url = f"{live.url}/api/v1/runs/{run_id}/logs/stream"
    clients = [httpx.Client(timeout=30) for _ in range(5)]
    readers = []  # kept referenced: dropping a reader would close its stream early
    try:
        for client in clients:
            response = client.send(
                client.build_request("GET", url, headers=live.headers()), stream=True
            )
            readers.append(read_events(response))
            kind, data = next(readers[-1])
            assert (kind, data["seq"]) == ("log", 1)
        assert live.gauge("conveyor_api_sse_streams") == 5
    finally:
        for client in clients:
            client.close()  # drops the connections mid-stream
    eventually(lambda: live.gauge("conveyor_api_sse_streams") == 0, timeout=15)
    assert httpx.get(f"{live.url}/healthz").status_code == 200


def test_signed_webhooks_over_http(live: LiveApi) -> None:
    hook = json.loads(live.cli("webhooks", "add", "deploy", "--target", "build", "--json"))
    secret = hook["secret"]
    url = f"{live.url}/hooks/deploy"
    body = b'{"ref": "main"}'

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            headers = signed_headers(secret, body, delivery="release-42")
            return await asyncio.gather(
                *(client.post(url, content=body, headers=headers) for _ in range(100))
            )

    responses = asyncio.run(burst())
    assert sorted(r.status_code for r in responses) == [200] * 99 + [202]
    assert len({r.json()["run_id"] for r in responses}) == 1
    with live.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(runs)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(webhooks.deliveries)).scalar() == 1

    late = signed_headers(secret, body, ts=int(time.time()) - 600)
    replay = httpx.post(url, content=body, headers=late)
    assert replay.status_code == 401 and replay.json()["error"]["type"] == "stale_timestamp"
    other = signed_headers(secret, body, delivery=str(uuid.uuid4()))
    assert httpx.post(f"{live.url}/hooks/nope", content=body, headers=other).status_code == 404


def test_a_50_mb_webhook_is_refused_before_it_is_read(live: LiveApi) -> None:
    live.cli("webhooks", "add", "deploy", "--target", "build")
    size = 50 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(
            b"POST /hooks/deploy HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {size}\r\n\r\n".encode()
            + b"x" * 65536  # the first 64 KB of 50 MB; the rest is never sent
        )
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(4096):  # the server answers, then closes the connection
                received += chunk
    answer = received.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer
    assert '"payload_too_large"' in answer
    assert httpx.get(f"{live.url}/healthz").status_code == 200
