"""Migrations: upgrade/downgrade/upgrade on both databases; the models and revisions agree."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from domain.db import create_db_engine
from domain.migrate import downgrade, head_revision, upgrade
from domain.schema import metadata
from tests.services import PG_ADMIN_URL, require_postgres


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    require_postgres()
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text('DROP DATABASE IF EXISTS "conveyor_migrations" WITH (FORCE)'))
        conn.execute(text('CREATE DATABASE "conveyor_migrations"'))
    yield make_url(PG_ADMIN_URL).set(database="conveyor_migrations").render_as_string(False)
    with admin.connect() as conn:
        conn.execute(text('DROP DATABASE IF EXISTS "conveyor_migrations" WITH (FORCE)'))
    admin.dispose()


def tables(url: str) -> set[str]:
    engine = create_db_engine(url, null_pool=True)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db: str) -> None:
    upgrade(empty_db)
    assert tables(empty_db) == set(metadata.tables)
    downgrade(empty_db, revision="base")
    assert tables(empty_db) == set()
    upgrade(empty_db)
    assert tables(empty_db) == set(metadata.tables)
    engine = create_db_engine(empty_db, null_pool=True)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM projects")).scalars().all() == ["default"]
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == (
            head_revision(empty_db)
        )
    engine.dispose()


def test_models_match_the_migrations(empty_db: str) -> None:
    """Autogenerate against the migrated schema finds nothing: every change has a revision."""
    upgrade(empty_db)
    engine = create_db_engine(empty_db, null_pool=True)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, metadata)
    engine.dispose()
    assert diff == []
