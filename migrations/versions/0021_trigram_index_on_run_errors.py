"""runs.error searchable by any part of its text, on PostgreSQL (pg_trgm)

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-03 13:40:00

The runs list filters on "text the error contains, any case" (`error ILIKE '%text%'`). A btree
cannot serve a pattern with a leading wildcard, so a rare text meant reading every run, newest
first, until the page filled: 170-270 ms at a million runs. A trigram GIN index answers it from
the runs whose error holds every three-letter piece of the text. Partial (runs with an error):
most runs have none, and they stay out of the index and cost nothing to write.

The index needs the pg_trgm extension (in PostgreSQL's contrib; trusted, so a database owner may
create it). Where it is not installed or may not be created, the migration says so and goes on
without the index: the search still works, by scanning. SQLite: no change. Autogenerate skips
this index (domain/db/schema.py): the models cannot declare what an extension provides.

Building the index reads every run with an error and blocks writes to `runs` meanwhile: on a
large installation, migrate in a quiet moment. Downgrading drops the index, not the extension
(other things may use it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_runs_error_trgm"
log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if not _trigrams(bind):
        return
    op.execute(
        f"CREATE INDEX IF NOT EXISTS {INDEX} ON runs USING gin (error gin_trgm_ops) "
        "WHERE error IS NOT NULL"
    )


def _trigrams(bind: sa.Connection) -> bool:
    """Whether pg_trgm is there, creating it when it may be."""
    found = bind.execute(
        sa.text(
            "SELECT installed_version IS NOT NULL FROM pg_available_extensions "
            "WHERE name = 'pg_trgm'"
        )
    ).scalar()
    if found:
        return True
    if found is None:
        log.warning("pg_trgm is not available on this server: the error search will scan")
        return False
    try:
        with bind.begin_nested():
            bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__
        log.warning("pg_trgm could not be created (%s): the error search will scan", reason)
        return False
    return True


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS {INDEX}")
