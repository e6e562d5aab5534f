"""Without `conveyor scheduler` nothing publishes retries or delayed runs and nothing recovers
the run of a worker that died: real workers and a real API say so (a warning a minute from
every worker, /readyz not ready), and a scheduler that starts picks the work up."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import Stack
from tests.polling import eventually
from tests.services import PrivateRedis, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def stack(pg_url: str, redis_server: PrivateRedis, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(pg_url, tmp_path, redis_server.url(5), CONVEYOR_NO_SCHEDULER_AFTER_S="3")
    s.redis.flushdb()
    try:
        yield s
    finally:
        s.stop_all()


def events(log: Path, name: str) -> list[dict[str, object]]:
    """The JSON log lines of `log` whose event is `name`."""
    found = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                found.append(record)
    return found


def readiness(url: str) -> tuple[int, str]:
    try:
        response = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.TransportError:
        return 0, ""
    return response.status_code, response.text


def test_a_dead_workers_run_waits_loudly_until_a_scheduler_leads(
    stack: Stack, tmp_path: Path
) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    stack.start("api", "--port", str(port), name="api")
    doomed = stack.worker("default", name="doomed", concurrency=1)
    marks = tmp_path / "marks"
    with stack.client() as client:
        run = client.enqueue("side_effect", {"marks": str(marks), "seconds": 2})
        eventually(lambda: marks.exists() and "start 1" in marks.read_text(), timeout=60)
        stack.kill(doomed)  # kill -9 mid-run: only a reaper can recover its run
        stack.worker("default", name="survivor", concurrency=1)

        eventually(lambda: bool(events(tmp_path / "survivor.log", "worker.no_scheduler")), 60)
        (warning,) = events(tmp_path / "survivor.log", "worker.no_scheduler")[:1]
        assert "no scheduler has led" in str(warning["problem"])
        eventually(lambda: readiness(api)[0] == 503, timeout=60)
        assert "no scheduler has led" in readiness(api)[1]
        assert client.get(run.id).status == "running"  # the dead worker's, lease long gone

        stack.scheduler()
        eventually(lambda: client.get(run.id).status == "succeeded", timeout=60)
        eventually(lambda: readiness(api)[0] == 200, timeout=30)
        assert client.get(run.id).attempt == 2  # the reaper's re-queue, run by the survivor
    assert marks.read_text().splitlines() == ["start 1", "start 2", "done 2"]
