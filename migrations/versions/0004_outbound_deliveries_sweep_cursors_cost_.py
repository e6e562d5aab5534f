"""outbound deliveries, sweep cursors, cost reservations

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 06:32:30.321222
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import domain.db.types

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweep_cursors",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("position", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "detail",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("updated_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_sweep_cursors")),
    )
    op.create_table(
        "cost_reservations",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("project", sa.String(length=100), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("usd", domain.db.types.Money(precision=20, scale=10), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("created_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("settled_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_cost_reservations_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cost_reservations")),
    )
    with op.batch_alter_table("cost_reservations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cost_reservations_run_id"), ["run_id"], unique=False)

    op.create_table(
        "outbound_deliveries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("rule_id", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("gave_up_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_outbound_deliveries_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_deliveries")),
        sa.UniqueConstraint("run_id", "kind", "rule_id", name="uq_outbound_deliveries_target"),
    )
    with op.batch_alter_table("outbound_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_outbound_deliveries_due",
            ["next_attempt_at"],
            unique=False,
            postgresql_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
            sqlite_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("outbound_deliveries", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_outbound_deliveries_due",
            postgresql_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
            sqlite_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
        )

    op.drop_table("outbound_deliveries")
    with op.batch_alter_table("cost_reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cost_reservations_run_id"))

    op.drop_table("cost_reservations")
    op.drop_table("sweep_cursors")
