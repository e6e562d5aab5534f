"""domain/db/driver.py on a real PostgreSQL: a connection the server dropped is replaced, and
the engine's pool, as stale, is recycled (a worker runs without pre-ping)."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from domain.db.driver import ThreadConnections
from domain.db.engine import create_db_engine, hung_up, libpq_conninfo
from tests.concurrent import exit_code_of_child, held_by_a_thread
from tests.polling import eventually

pytestmark = pytest.mark.postgres


def _pool_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_dropped_connection_is_replaced_and_the_pool_recycled(pg_url: str) -> None:
    pg_engine = create_db_engine(pg_url, pool_size=1, pre_ping=False)  # as a worker's
    connections = ThreadConnections(pg_engine)
    try:
        pooled = _pool_pid(pg_engine)  # one idle connection in the pool now
        with connections.connection() as raw:
            ours = raw.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            fileno = raw.fileno()
        # As a server restart would: both are cut (from a third session, outside the pool).
        with psycopg.connect(libpq_conninfo(pg_engine.url), autocommit=True) as admin:
            for pid in (ours, pooled):
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        eventually(lambda: hung_up(fileno), timeout=10)
        # Seen before use: a new connection, and no statement failed on the dead one.
        with connections.connection() as raw:
            assert raw.execute("SELECT pg_backend_pid()").fetchone()[0] != ours  # type: ignore[index]
        # The pool's connection was as dead: it is replaced at checkout, not used and failed.
        assert _pool_pid(pg_engine) != pooled
    finally:
        connections.close()


def test_a_connection_that_breaks_in_use_fails_that_call_and_is_replaced(pg_url: str) -> None:
    pg_engine = create_db_engine(pg_url, pool_size=1, pre_ping=False)
    connections = ThreadConnections(pg_engine)
    try:
        with pytest.raises(OperationalError), connections.connection() as raw:
            ours = raw.info.backend_pid
            raw.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        with connections.connection() as raw:
            assert raw.execute("SELECT pg_backend_pid()").fetchone()[0] != ours  # type: ignore[index]
    finally:
        connections.close()
        pg_engine.dispose()


@pytest.mark.postgres
def test_a_child_forked_while_a_thread_opens_a_connection_does_not_hang(pg_url: str) -> None:
    """A fork while another thread holds the connections' lock (opening or dropping one): the
    child opens its own connection and answers (it used to wait on the copied lock forever)."""
    engine = create_db_engine(pg_url)
    connections = ThreadConnections(engine)
    release, thread = held_by_a_thread(connections._lock)
    try:

        def query() -> None:
            with connections.connection() as raw:
                assert raw.execute("SELECT 1").fetchone() == (1,)

        assert exit_code_of_child(query) == 0
    finally:
        release.set()
        thread.join()
        connections.close()
        engine.dispose()
