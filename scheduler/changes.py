"""Schedule edits reach the leading scheduler at once: on PostgreSQL it LISTENs on the channel
that every schedule write NOTIFYs when it commits (domain.schedules.definitions.announce_change).

Polling stays as the safety net (a notification sent while the listener reconnects is lost)
and is SQLite's only way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import structlog
from sqlalchemy import Engine

from domain.schedules.definitions import CHANGES_CHANNEL

log = structlog.get_logger("conveyor.scheduler")

#: How often the listening thread looks up from its wait to see whether it should stop.
WAKE_S = 0.5


class ChangeListener:
    """A thread with a connection of its own, LISTENing; `on_change()` is called for each
    notification, and once after every (re)connect for what was missed while not listening."""

    def __init__(
        self, engine: Engine, on_change: Callable[[], None], *, retry_s: float = 1.0
    ) -> None:
        self.engine = engine
        self.on_change = on_change
        self.retry_s = retry_s
        self.listening = threading.Event()  # set while a LISTEN is in place
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="conveyor-schedule-changes", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._listen()
                self.listening.set()
                self.on_change()
                while not self._stop.is_set():
                    for _ in conn.notifies(timeout=WAKE_S):
                        self.on_change()
            except Exception as exc:  # the database went away: polling covers until we are back
                log.warning("scheduler.listen_failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._stop.wait(self.retry_s)

    def _listen(self) -> psycopg.Connection[Any]:
        """A psycopg connection taken out of the engine's pool for good, in autocommit."""
        fairy = self.engine.raw_connection()
        conn = fairy.driver_connection
        fairy.detach()
        if not isinstance(conn, psycopg.Connection):
            raise TypeError(f"LISTEN needs psycopg 3, got {type(conn).__name__}")
        try:
            conn.autocommit = True
            conn.execute(f'LISTEN "{CHANGES_CHANNEL}"')
        except Exception:
            conn.close()
            raise
        return conn
