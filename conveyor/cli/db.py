"""What one CLI command opens: the database (disposed when the command ends), or a Client."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine

from conveyor.client import Client
from domain.db.unit_of_work import UnitOfWork
from domain.settings import get_settings


@contextmanager
def cli_engine() -> Iterator[Engine]:
    from domain.db.engine import create_db_engine

    engine = create_db_engine(get_settings().effective_database_url, null_pool=True)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def cli_uow() -> Iterator[UnitOfWork]:
    with cli_engine() as engine:
        yield UnitOfWork(engine)


def client() -> Client:
    """The Client a command talks through: settings from CONVEYOR_* and `.env`."""
    return Client(get_settings(), triggered_by="cli")
