"""Where the real services are, and whether they answer (CI must have them; locally: skip).

Tests never touch a Redis they did not start: `PrivateRedis` runs a `redis-server` of the
test session's own on a free port (no disk, no other clients), so flushing it, restarting it or
stopping it harms nobody, and two copies of the suite on one machine do not meet.
`PrivatePostgres` does the same for tests that stop PostgreSQL: a cluster of their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.polling import eventually

PG_ADMIN_URL = os.environ.get("CONVEYOR_TEST_PG_URL", "postgresql+psycopg://127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def unavailable(message: str) -> None:
    """Skip the test when a service is missing on a developer machine; fail it in CI."""
    if IN_CI:
        pytest.fail(f"{message} (CI must provide it: see .ci/run)")
    pytest.skip(message)


def require(name: str, host: str, port: int) -> None:
    if not _port_open(host, port):
        unavailable(f"{name} is not reachable at {host}:{port}")


def require_postgres() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A `redis-server` of our own on a free loopback port, in memory only.

    `url(db)` names one of its databases; `stop()`/`start()` (or `restart()`) keep the port,
    so clients configured with the URL reconnect to the new server as they would in production.
    """

    def __init__(self, directory: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self.binary = str(binary)
        self.dir = directory or Path(tempfile.mkdtemp(prefix="conveyor-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> None:
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--databases", "32",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                text = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"private redis-server exited at start: {text}")
            return _port_open("127.0.0.1", self.port)

        eventually(listening, timeout, every=0.02, what="the private redis-server listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb, pg_ctl) on a free loopback port, trust auth.

    `stop()` is an immediate shutdown, a crash as clients see it; `start()` again keeps the
    port and the data. PostgreSQL refuses to run as root, so as root its commands run as the
    `postgres` user, on a data directory that user owns (outside pytest's private tmp tree).
    """

    BIN = Path(os.environ.get("CONVEYOR_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))

    def __init__(self) -> None:
        if not (self.BIN / "initdb").exists():
            unavailable(f"PostgreSQL's initdb is not in {self.BIN} (set CONVEYOR_TEST_PG_BIN)")
        self.dir = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            import pwd

            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir}"
            " -c fsync=off -c full_page_writes=off"
        )
        log = str(self.dir / "postgres.log")
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start"
        )

    def stop(self) -> None:
        """Immediate shutdown: every connection is cut, nothing is flushed first."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.BIN / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, timeout=120, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"{tool} failed ({done.returncode}): {output}")


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """An empty PostgreSQL database with a name no other test run uses, dropped afterwards.

    Yields its SQLAlchemy URL (psycopg driver)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    require_postgres()
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
