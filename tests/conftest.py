"""Database fixtures: one test runs on SQLite and on PostgreSQL, each test on a clean schema."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from domain.db.engine import create_db_engine
from domain.db.migrate import upgrade
from domain.db.schema import metadata
from domain.db.unit_of_work import UnitOfWork
from tests.collector import collect_and_report
from tests.fakes import FakeClock, FakePublisher
from tests.services import PrivateRedis, fresh_database

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(autouse=True, scope="module")
def _sockets_left_to_the_collector() -> Iterator[None]:
    """After each test file, a full collection that names it if it left a socket unclosed."""
    yield
    collect_and_report()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (migrating once keeps tests fast)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """This session's own redis-server: tests flush, restart and stop it without harm."""
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: PrivateRedis) -> str:
    """Database 0 of the private Redis, emptied for this test."""
    import redis

    if redis_server.proc is None:  # a test before this one stopped it
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url(0))
    client.flushdb()
    client.close()
    return redis_server.url(0)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A dedicated, migrated PostgreSQL database for this test session."""
    with fresh_database(f"conveyor_test_{WORKER}") as url:
        upgrade(url)
        yield url


def _truncate_pg(url: str) -> None:
    engine = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        conn.execute(text("INSERT INTO projects (name, created_at) VALUES ('default', now())"))
    engine.dispose()


@pytest.fixture
def pg_url(pg_database: str) -> str:
    _truncate_pg(pg_database)
    return pg_database


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "conveyor.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test on both databases conveyor supports."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_db_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """An engine on the (emptied) PostgreSQL test database, for tests of PostgreSQL only."""
    eng = create_db_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def uow(engine: Engine, clock: FakeClock) -> UnitOfWork:
    return UnitOfWork(engine, clock=clock)


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> None:
    """Tests read events with structlog.testing.capture_logs, not from the console."""
    from domain.logging import configure_logging

    configure_logging("console", "WARNING", force=True)
