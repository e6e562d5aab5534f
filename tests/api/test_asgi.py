"""api.asgi.create_app: the API built from the environment, for `uvicorn --factory`."""

from __future__ import annotations

import gc

import pytest
from anyio.from_thread import start_blocking_portal
from psycopg import pq

from api.asgi import create_app
from domain.db.engine import create_db_engine
from domain.db.unit_of_work import UnitOfWork
from domain.runs.repository import RunFilter
from tests.api.conftest import SECRET_KEY, ApiClient


def test_the_factory_serves_the_api_from_the_environment(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", db_url)
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "memory://")
    monkeypatch.setenv("CONVEYOR_SECRET_KEY", SECRET_KEY)
    app = create_app()
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
    ):
        client = ApiClient(app, portal)
        try:
            assert client.get("/readyz").status_code == 200
            assert client.get("/api/v1/runs").status_code == 401  # tokens, as `conveyor api`
        finally:
            client.close()


def test_the_startup_heap_is_out_of_the_collectors_reach_while_serving(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full collection of the API's heap takes tens of milliseconds, which would land on
    the requests in flight: the lifespan freezes what startup loaded, and thaws it at the end."""
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", db_url)
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "memory://")
    monkeypatch.setenv("CONVEYOR_SECRET_KEY", SECRET_KEY)
    app = create_app()
    assert gc.get_freeze_count() == 0
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
    ):
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


def _open_transaction(uow: UnitOfWork) -> bool:
    """Whether the database connection itself is inside a transaction (BEGIN was sent)."""
    raw = uow.conn.connection.driver_connection
    if uow.conn.dialect.name == "sqlite":
        return bool(raw.in_transaction)  # type: ignore[union-attr]
    return raw.info.transaction_status != pq.TransactionStatus.IDLE  # type: ignore[union-attr]


def test_reads_run_outside_a_transaction(api: ApiClient) -> None:
    """Read-only endpoints use state.reader(): autocommit, so no BEGIN/ROLLBACK round trips."""
    with api.state.reader() as uow:
        assert uow.runs.page(RunFilter(), limit=1).items == []
        assert not _open_transaction(uow)
    with api.state.uow() as uow:
        uow.runs.page(RunFilter(), limit=1)
        assert _open_transaction(uow)


def test_a_reader_hands_its_connection_back_as_it_found_it(db_url: str) -> None:
    """One pooled connection, a reader then a writer: the writer still gets its transaction
    (on SQLite: BEGIN IMMEDIATE, with pysqlite's own implicit transactions still off)."""
    engine = create_db_engine(db_url, pool_size=1)
    try:
        with UnitOfWork(engine, read_only=True) as uow:
            uow.runs.page(RunFilter(), limit=1)
            assert not _open_transaction(uow)
        with UnitOfWork(engine) as uow:
            uow.runs.page(RunFilter(), limit=1)
            assert _open_transaction(uow)
            raw = uow.conn.connection.driver_connection
            if uow.conn.dialect.name == "sqlite":
                assert raw.isolation_level is None  # type: ignore[union-attr]
            else:
                assert raw.autocommit is False  # type: ignore[union-attr]
    finally:
        engine.dispose()
