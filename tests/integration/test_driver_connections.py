"""domain/db/driver.py on a real PostgreSQL: a connection the server dropped is replaced, and
the engine's pool, as stale, is recycled (a worker runs without pre-ping)."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from domain.db.driver import ThreadConnections
from domain.db.engine import create_db_engine, libpq_conninfo

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
        # As a server restart would: both are cut (from a third session, outside the pool).
        with psycopg.connect(libpq_conninfo(pg_engine.url), autocommit=True) as admin:
            for pid in (ours, pooled):
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(OperationalError), connections.connection() as raw:
            raw.execute("SELECT 1")
        with connections.connection() as raw:  # a new one
            assert raw.execute("SELECT pg_backend_pid()").fetchone()[0] != ours  # type: ignore[index]
        # The pool's connection was as dead: it is replaced at checkout, not used and failed.
        assert _pool_pid(pg_engine) != pooled
    finally:
        connections.close()
        pg_engine.dispose()
