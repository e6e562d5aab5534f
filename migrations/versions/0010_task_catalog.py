"""task_catalog: the tasks workers have, for producers that do not import them

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 20:40:00

Workers publish each registered task (its params as a JSON Schema, queue, attempts, timeout,
retry, schedule, follow-ups) when they start; every producer (Client, CLI, API, webhooks,
schedules, conveyor.submit) validates params against it and applies the task's defaults. A new
table: upgrading and downgrading lock nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import domain.db.types

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "task_catalog",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("params_schema", _json(), nullable=False),
        sa.Column("options", _json(), nullable=False),
        sa.Column("module", sa.String(length=300), nullable=True),
        sa.Column("registered_by", sa.String(length=200), nullable=True),
        sa.Column("registered_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_task_catalog")),
    )


def downgrade() -> None:
    op.drop_table("task_catalog")
