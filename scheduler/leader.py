"""Leadership: exactly one scheduler instance sweeps and fires; the others wait as standbys."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO, Protocol

import structlog
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from domain.db.capabilities import capabilities

log = structlog.get_logger("conveyor.scheduler")

#: pg_advisory_lock key: "conveyor" in ASCII, so it does not collide with other apps by chance.
ADVISORY_KEY = 0x636F6E7665796F72
IDLE_TIMEOUT_S = 10


class Leadership(Protocol):
    def try_acquire(self) -> bool: ...
    def still_held(self) -> bool: ...
    def release(self) -> None: ...


class AdvisoryLock:
    """A session-level PostgreSQL advisory lock on a connection of its own.

    The lock lives exactly as long as that session: if this process dies, freezes past TCP
    keepalive, or loses the database, PostgreSQL frees it and a standby takes over.
    """

    def __init__(self, engine: Engine, key: int = ADVISORY_KEY) -> None:
        self.engine = engine
        self.key = key
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        try:
            if self._conn is None:
                self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                # A frozen leader (SIGSTOP, a stuck VM) still answers TCP keepalives, so its
                # session and lock would live on; we touch the session every second, and
                # PostgreSQL ends it after this much silence, freeing the lock for a standby.
                self._conn.execute(text(f"SET idle_session_timeout = '{IDLE_TIMEOUT_S}s'"))
            got = self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key})
            return bool(got.scalar())
        except DBAPIError as exc:
            log.warning("leader.acquire_failed", reason=str(exc.orig))
            self._drop()
            return False

    def still_held(self) -> bool:
        if self._conn is None:
            return False
        try:
            held = self._conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND objid = (CAST(:k AS bigint) & 4294967295)"
                ),
                {"k": self.key},
            ).scalar()
            return bool(held)
        except DBAPIError as exc:
            log.warning("leader.lost", reason=str(exc.orig))
            self._drop()
            return False

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(DBAPIError):
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except DBAPIError:
                pass
            self._conn = None


class FileLock:
    """For SQLite (one machine): an exclusive flock beside the database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for as long as we lead
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return True

    def still_held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def leadership_for(engine: Engine, home: Path) -> Leadership:
    if capabilities(engine).advisory_locks:
        return AdvisoryLock(engine)
    return FileLock(home / "scheduler.lock")
