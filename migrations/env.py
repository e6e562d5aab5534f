"""Alembic environment: the database comes from conveyor's Settings (or a passed connection)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alembic import context
from sqlalchemy import Connection

from domain.db.engine import create_db_engine
from domain.db.schema import compared_by_autogenerate, compared_objects, metadata
from domain.settings import get_settings

config = context.config
target_metadata = metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=compared_by_autogenerate,
        include_object=compared_objects(connection),
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
    )


@contextmanager
def _foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite's batch mode rebuilds a table by copying it and dropping the original; with
    foreign keys on, dropping `runs` would first delete every row that cascades from it (logs,
    steps, costs). They are switched off for the migration (outside any transaction, or SQLite
    ignores it), and the rows are checked against their keys before it commits."""
    if connection.dialect.name != "sqlite":
        yield
        return
    raw = connection.connection.driver_connection
    raw.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
    try:
        yield
    finally:
        raw.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]


def _migrate(connection: Connection) -> None:
    _configure(connection)
    with _foreign_keys_off(connection), context.begin_transaction():
        context.run_migrations()
        if connection.dialect.name == "sqlite":
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left rows without their parent: {broken[:5]}")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or get_settings().effective_database_url
    engine = create_db_engine(url, null_pool=True)
    try:
        with engine.connect() as conn:
            _migrate(conn)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or get_settings().effective_database_url
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
