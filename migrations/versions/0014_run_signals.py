"""run_signals: signals sent to runs, kept until a ctx.wait_for of their name consumes them

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 04:20:00

`ctx.wait_for("approval")` waits (the run `waiting`, reason `signal:approval`, holding no
worker) until a signal of that name is sent with `client.signal`, the API or the CLI. A
signal sent before the run reaches its wait is kept here and consumed there; a repeated key
is the same signal (a partial unique index, keys being optional).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import domain.db.types

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run_signals",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=True),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("sent_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("consumed_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_signals_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_signals")),
    )
    op.create_index("ix_run_signals_run_name", "run_signals", ["run_id", "name", "id"])
    op.create_index(
        "uq_run_signals_key",
        "run_signals",
        ["run_id", "name", "key"],
        unique=True,
        postgresql_where=sa.text("key IS NOT NULL"),
        sqlite_where=sa.text("key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_run_signals_key", table_name="run_signals")
    op.drop_index("ix_run_signals_run_name", table_name="run_signals")
    op.drop_table("run_signals")
