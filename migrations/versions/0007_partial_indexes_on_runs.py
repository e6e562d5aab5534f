"""runs: partial indexes where most rows hold NULL (idempotency key, finished_at, parent)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 13:30:00

Every enqueue inserted an entry into three B-trees for values that are NULL in most runs: the
idempotency key (most runs have none), finished_at (a new run has not finished) and
parent_run_id (most runs have no parent). Each index now only holds the rows it serves.
Measured on COPY of 1,000-run batches: about 2.5 us less database time per run, on the path
enqueue_many waits on. The unique index's meaning is unchanged (NULL keys never conflicted);
ON CONFLICT statements name its predicate so PostgreSQL and SQLite still infer it.

On a large runs table, recreating the indexes holds a write lock while they build: run this
migration in a quiet moment.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (index, columns, unique, predicate)
INDEXES = [
    ("uq_runs_project_idempotency_key", ["project", "idempotency_key"], True, "idempotency_key"),
    ("ix_runs_finished_at", ["finished_at"], False, "finished_at"),
    ("ix_runs_parent_run_id", ["parent_run_id"], False, "parent_run_id"),
]


def upgrade() -> None:
    for name, columns, unique, column in INDEXES:
        where = sa.text(f"{column} IS NOT NULL")
        op.drop_index(name, table_name="runs")
        op.create_index(
            name, "runs", columns, unique=unique, postgresql_where=where, sqlite_where=where
        )


def downgrade() -> None:
    for name, columns, unique, _column in INDEXES:
        op.drop_index(name, table_name="runs")
        op.create_index(name, "runs", columns, unique=unique)
