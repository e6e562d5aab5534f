"""Engines and sessions: PostgreSQL through psycopg 3, SQLite with WAL; waiting for the database."""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from domain.errors import DatabaseUnavailable
from domain.settings import redact_url

log = structlog.get_logger("conveyor.db")

SQLITE_BUSY_TIMEOUT_MS = 30_000


#: How conveyor connects to PostgreSQL (the engine's pool, and the worker's own connections).
PG_CONNECT_ARGS: dict[str, str | int] = {"connect_timeout": 5, "application_name": "conveyor"}


def uses_psycopg(bind: Engine | Connection) -> bool:
    """PostgreSQL through psycopg: where the hot paths may use the driver directly."""
    return bind.dialect.name == "postgresql" and bind.dialect.driver == "psycopg"


def hung_up(fileno: int) -> bool:
    """Whether the server has spoken on an idle connection's socket: between statements it
    says nothing unless it ends the session (its restart, a backend killed, an idle timeout),
    so readable means closed. One poll, no round trip; a connection dead without a word (a lost
    network) is not seen, and its next statement fails as before."""
    poller = select.poll()
    poller.register(fileno, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def _refuse_hung_up(engine: Engine) -> None:
    """Without pre-ping, a pooled connection the server closed while it sat idle (a worker
    idle through a restart) would fail the first statement given to it, a run's step read for
    one. Checked at checkout instead: a hung-up connection is replaced by a new one."""

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        fileno = getattr(dbapi_conn, "fileno", None)
        if fileno is not None and hung_up(fileno()):
            raise DisconnectionError("the server closed this idle connection")


def libpq_conninfo(url: str | URL, **extra: str | int) -> str:
    """`url` (SQLAlchemy's postgresql+psycopg://...) as a libpq connection string for psycopg
    itself, with conveyor's connection arguments: for code that bypasses the engine's pool.
    The arguments are the ones the engine's dialect would connect with (several hosts, a
    socket directory, sslmode, options: all as the engine reads them)."""
    from psycopg.conninfo import make_conninfo

    parsed = make_url(url)
    _, params = parsed.get_dialect()().create_connect_args(parsed)
    params.pop("context", None)  # a psycopg AdaptersMap the dialect may pass, not a keyword
    return make_conninfo("", **{**PG_CONNECT_ARGS, **params, **extra})


def create_db_engine(
    url: str, *, pool_size: int = 5, null_pool: bool = False, pre_ping: bool = True
) -> Engine:
    """An engine for `url` (already normalised by Settings).

    SQLite gets WAL (readers never block the writer), foreign keys and a busy timeout, and a
    `BEGIN IMMEDIATE` for every transaction so two writers queue instead of failing on upgrade.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {
            "check_same_thread": False,
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
        }
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs["connect_args"] = dict(PG_CONNECT_ARGS)
    if null_pool:
        kwargs["poolclass"] = NullPool
    else:
        # pre_ping costs a round trip per checkout; hot paths (workers, the scheduler) turn it
        # off: a connection the server closed is seen at checkout without one (hung_up).
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=pre_ping)
    engine = create_engine(url, **kwargs)
    if not pre_ping:
        _refuse_hung_up(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's own implicit transactions are off).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A read-only unit of work runs in autocommit: no transaction, and no write lock.
        if not conn.get_execution_options().get("conveyor_read_only"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


def describe_db_error(url: str, exc: BaseException) -> str:
    """One line saying which database failed and why, without credentials."""
    orig = getattr(exc, "orig", None) or exc
    reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return f"cannot reach the database {redact_url(url)}: {reason}"


def wait_for_database(
    engine: Engine,
    *,
    timeout_s: float,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Block until `engine` answers `SELECT 1`, retrying with backoff up to `timeout_s`.

    Raises DatabaseUnavailable with the last reason (credentials masked) when it stays down.
    """
    deadline = monotonic() + timeout_s
    delay = 0.2
    attempt = 0
    while True:
        attempt += 1
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except (OperationalError, DBAPIError) as exc:
            message = describe_db_error(engine.url.render_as_string(hide_password=False), exc)
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise DatabaseUnavailable(
                    f"{message} (gave up after {attempt} attempts over {timeout_s:g}s)"
                ) from None
            log.info("db.waiting", attempt=attempt, reason=message, retry_in=round(delay, 2))
            sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)


@contextmanager
def single_statement(engine: Engine) -> Iterator[Connection]:
    """A connection for one statement that is its own transaction. On PostgreSQL it runs in
    autocommit mode: no BEGIN and COMMIT round trips around it. On SQLite (one writer, a local
    file) it is an ordinary transaction, which takes the write lock up front."""
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn
