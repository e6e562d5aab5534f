"""docker-compose.yml: valid for `docker-compose config` (or `docker compose config`), and each
service's own `command:` started natively here, on this machine's PostgreSQL and Redis, with
the env file the compose file names, works with the others: migrate exits 0, the API is ready,
a run enqueued through the API is executed by the worker, the scheduler relays a delayed run
and POSTs its callback, and Flower answers with the worker in its list."""

from __future__ import annotations

import os
import shutil
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
import yaml
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from domain.db.migrate import head_revision
from tests.e2e.stack import ROOT
from tests.http_receiver import Receiver, free_port
from tests.polling import eventually
from tests.services import IN_CI, PrivateRedis, fresh_database

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"postgres", "redis", "migrate", "api", "worker", "scheduler", "flower"}
CONVEYOR_SERVICES = ("migrate", "api", "worker", "scheduler", "flower")
REDIS_DB = 10


def compose_tool() -> list[str] | None:
    """docker-compose (v1, Debian's package) or the docker CLI's compose plugin (v2)."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as compose reads an env_file (comments and blank lines skipped)."""
    values = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_compose_config_is_valid() -> None:
    tool = compose_tool()
    if tool is None:
        message = "neither docker-compose nor `docker compose` is installed (see .ci/run)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_ENV_FILE"}
    result = subprocess.run(
        [*tool, "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == SERVICES
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "scheduler", "flower"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    for name in ("postgres", "redis", "api", "worker", "flower"):
        assert services[name]["healthcheck"]["test"], name
    expected = read_env_file(ROOT / ".env.example")
    for name in CONVEYOR_SERVICES:
        environment = services[name]["environment"]
        assert environment["CONVEYOR_DATABASE_URL"] == expected["CONVEYOR_DATABASE_URL"], name
        assert environment["CONVEYOR_BROKER_URL"] == expected["CONVEYOR_BROKER_URL"], name
    flower = services["flower"]
    assert flower["command"][:4] == ["celery", "-A", "worker.celery_app", "flower"]
    # Its task history outlives a restart: kept on a named volume.
    assert {"--persistent=True", "--db=/data/flower.db"} <= set(flower["command"])
    # docker-compose v1 prints "source:target:mode", the compose plugin a mapping.
    mounts = [
        (v["source"], v["target"]) if isinstance(v, dict) else tuple(v.split(":")[:2])
        for v in flower["volumes"]
    ]
    assert mounts == [("flowerdata", "/data")], mounts
    assert "flowerdata" in config["volumes"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == expected["FLOWER_BASIC_AUTH"]


# -- the services' commands, natively ----------------------------------------------------------
def native(command: list[str], ports: dict[str, int], data: Path) -> list[str]:
    """A compose `command:` for this machine: our interpreter, loopback, free ports, and the
    `data` folder for files the container keeps on a volume under /data."""
    program, *args = command
    argv = [sys.executable, "-m", program] if program in {"conveyor", "celery"} else [program]
    out: list[str] = []
    for arg in args:
        if out and out[-1] == "--port":
            out.append(str(ports[arg]))
        elif arg.startswith("--port="):
            out.append(f"--port={ports[arg.split('=', 1)[1]]}")
        elif arg.startswith("--db=/data/"):
            out.append(f"--db={data / arg.removeprefix('--db=/data/')}")
        else:
            out.append(arg.replace("0.0.0.0", "127.0.0.1"))
    return argv + out


@pytest.fixture
def database() -> Iterator[str]:
    """An empty database, for `conveyor migrate` to create the schema in."""
    with fresh_database("conveyor_compose") as url:
        yield make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Natives:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=self.logs,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def alive(self, name: str) -> None:
        if self.procs[name].poll() is not None:
            raise AssertionError(f"{name} exited: {self.log(name)}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_each_service_command_runs_natively_and_they_work_together(
    database: str, redis_server: PrivateRedis, tmp_path: Path
) -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    env_file = ROOT / services["api"]["env_file"].split(":-", 1)[1].rstrip("}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "FLOWER_"))}
    env |= read_env_file(env_file)
    broker = redis_server.url(REDIS_DB)
    env |= {
        # Where the compose network says postgres:5432 and redis:6379, this machine's servers.
        "CONVEYOR_DATABASE_URL": database,
        "CONVEYOR_BROKER_URL": broker,
        "CONVEYOR_SECRET_KEY": Fernet.generate_key().decode(),
        "CONVEYOR_TASK_MODULES": "tests.e2e.worker_tasks",
        "CONVEYOR_RELAY_INTERVAL_S": "0.2",
        "CONVEYOR_OUTBOUND_ALLOW_PRIVATE": "true",  # the callback receiver is on 127.0.0.1
        "PYTHONPATH": str(ROOT),
    }
    redis.Redis.from_url(broker).flushdb()
    ports = {"8000": free_port(), "5555": free_port()}
    api_url, flower_url = f"http://127.0.0.1:{ports['8000']}", f"http://127.0.0.1:{ports['5555']}"
    user, _, password = env["FLOWER_BASIC_AUTH"].partition(":")
    natives = Natives(env, tmp_path)
    try:
        migrate = natives.start("migrate", native(services["migrate"]["command"], ports, tmp_path))
        assert migrate.wait(timeout=120) == 0, natives.log("migrate")
        for name in ("api", "worker", "scheduler", "flower"):
            natives.start(name, native(services[name]["command"], ports, tmp_path))

        def ready() -> bool:
            natives.alive("api")
            try:
                return httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        eventually(ready, timeout=60)
        assert httpx.get(f"{api_url}/readyz").json()["revision"] == head_revision(database)

        token = subprocess.run(
            [sys.executable, "-m", "conveyor", "tokens", "create", "ops", "--role", "write"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()[-1]
        headers = {"Authorization": f"Bearer {token}"}
        with Receiver() as receiver:
            now = httpx.post(
                f"{api_url}/api/v1/runs",
                json={"name": "noop", "params": {"i": 1}, "callback_url": receiver.url},
                headers=headers,
            ).json()
            # Not due yet when created: the scheduler's relay publishes it later.
            later = httpx.post(
                f"{api_url}/api/v1/runs",
                json={"name": "noop", "params": {"i": 2}, "delay_s": 1},
                headers=headers,
            ).json()

            def finished(run_id: str) -> bool:
                for name in ("worker", "scheduler"):
                    natives.alive(name)
                run = httpx.get(f"{api_url}/api/v1/runs/{run_id}", headers=headers).json()
                return bool(run["status"] == "succeeded")

            eventually(lambda: finished(now["id"]), timeout=90)
            eventually(lambda: finished(later["id"]), timeout=60)
            eventually(lambda: len(receiver.posts()) == 1, timeout=30)
            [callback] = receiver.posts()
            assert callback.headers["x-conveyor-delivery"] == f"{now['id']}:1"

        natives.alive("flower")
        assert httpx.get(f"{flower_url}/healthcheck", timeout=5).text == "OK"

        def flower_sees_the_worker() -> bool:
            natives.alive("flower")
            answer = httpx.get(
                f"{flower_url}/api/workers?refresh=1", auth=(user, password), timeout=10
            )
            return answer.status_code == 200 and any(
                name.startswith("celery@") for name in answer.json()
            )

        eventually(flower_sees_the_worker, timeout=60, every=1)
        unauthorised = httpx.get(f"{flower_url}/api/workers", timeout=10)
        assert unauthorised.status_code == 401
    finally:
        natives.stop_all()
    for name in ("api", "worker", "scheduler", "flower"):
        assert "Traceback" not in natives.log(name), natives.log(name)
    assert list(tmp_path.glob("flower.db*")), "Flower saved no state for --persistent"
    assert uuid.UUID(now["id"]) and uuid.UUID(later["id"])
