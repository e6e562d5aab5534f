"""Real conveyor processes for end-to-end tests: workers and a scheduler on PostgreSQL + Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

from conveyor import Client
from domain.settings import Settings, load_settings
from tests.polling import eventually
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]


class Stack:
    """Starts and stops conveyor processes sharing one database and one broker (a database of
    the test session's private Redis, see tests/enqueue.py)."""

    def __init__(self, database_url: str, logs: Path, broker_url: str, **overrides: str) -> None:
        self.broker_url = broker_url
        self._redis: redis.Redis | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        self.env.update(
            {
                "CONVEYOR_DATABASE_URL": database_url,
                "CONVEYOR_BROKER_URL": broker_url,
                "CONVEYOR_TASK_MODULES": "tests.e2e.worker_tasks",
                "CONVEYOR_LEASE_S": "3",
                "CONVEYOR_HEARTBEAT_S": "0.5",
                "CONVEYOR_DISPATCH_GRACE_S": "2",
                "CONVEYOR_RELAY_INTERVAL_S": "0.2",
                "CONVEYOR_REAPER_INTERVAL_S": "0.5",
                "CONVEYOR_KILL_GRACE_S": "0.5",
                "CONVEYOR_LOG_FORMAT": "json",
                "PYTHONPATH": str(ROOT),
                **overrides,
            }
        )
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def redis(self) -> redis.Redis:
        """A client of the broker's Redis database (for stacks on Redis)."""
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.broker_url)
        return self._redis

    @property
    def settings(self) -> Settings:
        fields = {
            k.removeprefix("CONVEYOR_").lower(): v
            for k, v in self.env.items()
            if k.startswith("CONVEYOR_")
        }
        return load_settings(**fields)

    def client(self) -> Client:
        return Client(self.settings)

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:  # the child keeps its own fd
            proc = subprocess.Popen(
                [sys.executable, "-m", "conveyor", *args],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def worker(self, queues: str, *, name: str, concurrency: int = 2) -> subprocess.Popen[bytes]:
        return self.start(
            "worker",
            "-Q",
            queues,
            "-c",
            str(concurrency),
            "-l",
            "WARNING",
            "-n",
            f"{name}@%h",
            "--without-mingle",
            "--without-gossip",
            name=name,
        )

    def scheduler(self) -> subprocess.Popen[bytes]:
        return self.start("scheduler", name="scheduler")

    def api(self, *args: str, name: str = "api") -> str:
        """`conveyor api` on a free loopback port; its base URL once /healthz answers."""
        port = free_port()
        proc = self.start("api", "--port", str(port), *args, name=name)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if proc.poll() is not None:
                log = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"conveyor api exited with {proc.returncode}: {log}")
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        eventually(healthy, timeout=60, every=0.2)
        return url

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a worker's children die with it, as with a host)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def terminate(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
        """SIGTERM to the main process only, as docker stop or systemd (KillMode=mixed) do."""
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)
        self.procs.clear()


@contextlib.contextmanager
def with_scheduler(database_url: str, broker_url: str, tmp_path: Path) -> Iterator[Stack]:
    """A Stack on an emptied broker database with a scheduler running (its relay and reaper),
    every process stopped afterwards."""
    logs = tmp_path / "logs"
    logs.mkdir()
    stack = Stack(database_url, logs, broker_url)
    stack.redis.flushdb()
    stack.scheduler()
    try:
        yield stack
    finally:
        stack.stop_all()
