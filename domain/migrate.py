"""Run Alembic from code: `conveyor migrate`, dev mode and tests all go through here."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations
from domain.db import create_db_engine, wait_for_database

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, *, revision: str = "head", wait_s: float = 30.0) -> None:
    """Wait for the database (clear error if it stays down), then upgrade to `revision`."""
    engine = create_db_engine(url, null_pool=True)
    try:
        wait_for_database(engine, timeout_s=wait_s)
    finally:
        engine.dispose()
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, *, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def ensure_schema(url: str) -> None:
    """Upgrade to head only when behind (cheap on every start of dev mode)."""
    engine = create_db_engine(url, null_pool=True)
    try:
        behind = current_revision(engine) != head_revision(url)
    finally:
        engine.dispose()
    if behind:
        upgrade(url)
