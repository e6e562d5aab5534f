"""Processes started before `conveyor migrate` wait for the schema instead of crashing; one-off
commands say what to do in one line (the README's production path, taken out of order)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import Stack
from tests.polling import eventually
from tests.services import PrivateRedis, free_port, fresh_database

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture
def empty_database() -> Iterator[str]:
    with fresh_database("conveyor_startup") as url:
        yield url


def test_api_worker_and_scheduler_wait_for_migrate(
    empty_database: str, redis_server: PrivateRedis, tmp_path: Path
) -> None:
    stack = Stack(empty_database, tmp_path, redis_server.url(7))
    port = free_port()
    try:
        api = stack.start("api", "--port", str(port), name="api")
        worker = stack.worker("default", name="w", concurrency=1)
        scheduler = stack.scheduler()

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "conveyor", *args],
                env=stack.env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        early = cli("tokens", "create", "ops", "--role", "admin")
        assert early.returncode == 1
        assert early.stderr.count("\n") == 1, early.stderr
        assert "has no conveyor schema yet: run `conveyor migrate`" in early.stderr

        def waiting(name: str) -> bool:
            return "db.waiting_for_schema" in (tmp_path / f"{name}.log").read_text()

        eventually(lambda: all(waiting(n) for n in ("api", "w", "scheduler")), timeout=60)
        assert all(p.poll() is None for p in (api, worker, scheduler))  # none gave up

        assert cli("migrate").returncode == 0
        url = f"http://127.0.0.1:{port}"
        eventually(lambda: _answers(f"{url}/readyz"), timeout=60)
        with stack.client() as client:
            run = client.enqueue("noop", {"i": 1})
            assert client.wait(run.id, timeout=90).status == "succeeded"
        token = cli("tokens", "create", "ops", "--role", "admin")
        assert token.returncode == 0, token.stderr
    finally:
        stack.stop_all()
    for name in ("api", "w", "scheduler"):
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text(), name


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
