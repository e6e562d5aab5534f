"""A psycopg connection per thread, in autocommit mode and outside the engine's pool, for the
hot paths that run one prepared statement per call (the worker's claim and finish, a single
enqueue): the pool's checkout, reset and check-in, and an explicit BEGIN and COMMIT, cost more
than the statement itself. A single statement is its own transaction, so nothing is weakened.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError

from domain.db.engine import hung_up, libpq_conninfo
from domain.forks import ForkSafeLock


class ThreadConnections:
    """Each thread that asks gets a connection of its own, opened on first use. One that
    breaks is dropped and the next call opens a new one; the error reaches the caller as
    SQLAlchemy's (OperationalError: retry later), as from any other database call. A process
    forked after a connection was opened never uses its parent's: it opens its own."""

    def __init__(self, engine: Engine) -> None:
        # Not the engine itself: what holds these may be kept per engine, weakly keyed.
        self._dialect = engine.dialect
        self._engine = weakref.ref(engine)
        self._conninfo = libpq_conninfo(engine.url)
        self._local = threading.local()
        self._opened: list[psycopg.Connection[Any]] = []
        self._lock = ForkSafeLock()  # a child forked while a thread held it starts with it free
        self._pid = os.getpid()

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():  # a forked child must not end its parent's sessions
                for conn in self._opened:
                    conn.close()
            self._opened.clear()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self._pid != os.getpid():  # forked: the parent's connections are not ours
            self._pid = os.getpid()
            self._local = threading.local()
            with self._lock:
                self._opened.clear()
        raw: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if raw is not None and not raw.closed and hung_up(raw.fileno()):
            # The server ended the session while it sat idle (most often: it restarted), so
            # the pool's idle connections are likely gone too; this one is replaced unused.
            self._drop(raw)
            self._pool_is_stale()
            raw = None
        try:
            if raw is None or raw.closed:
                raw = psycopg.connect(self._conninfo, autocommit=True)
                self._local.conn = raw
                with self._lock:
                    self._opened.append(raw)
            yield raw
        except psycopg.Error as exc:
            if raw is None:  # the server could not be reached at all
                self._pool_is_stale()
            elif raw.closed or raw.broken:
                self._drop(raw)
                self._pool_is_stale()
            raise DBAPIError.instance("", None, exc, psycopg.Error, dialect=self._dialect) from exc

    def _pool_is_stale(self) -> None:
        """The server closed a connection of ours, or could not be reached (most often: it
        restarted), so the engine's idle pooled connections, opened before, are most likely
        dead too: they are recycled at their next checkout, as SQLAlchemy does when one of its
        own connections finds the server gone. (Workers run without pre-ping; without this,
        the first statement on each stale pooled connection, a task's step read for one,
        would fail its run.)"""
        engine = self._engine()
        if engine is not None:
            engine.pool._invalidate(None)  # type: ignore[arg-type]  # no record: all of them

    def _drop(self, raw: psycopg.Connection[Any]) -> None:
        raw.close()
        self._local.conn = None
        with self._lock:
            if raw in self._opened:
                self._opened.remove(raw)


_shared: weakref.WeakKeyDictionary[Engine, ThreadConnections] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def shared_connections(engine: Engine) -> ThreadConnections:
    """One ThreadConnections per engine, for the callers in a process that share it (the
    single enqueue, ctx.acquire); they close when the engine is disposed or collected."""
    found = _shared.get(engine)
    if found is None:
        with _shared_lock:
            found = _shared.get(engine)
            if found is None:
                found = _shared[engine] = ThreadConnections(engine)
                made = found
                event.listen(engine, "engine_disposed", lambda _engine: made.close())
                weakref.finalize(engine, made.close)
    return found
