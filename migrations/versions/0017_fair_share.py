"""fair share: runs.paced, projects.weight, and the indexes the dispatcher's turns read

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02 14:10:00

A run created while its queue already has `dispatch_in_flight` published runs unclaimed (or
runs waiting for their turn) is `paced`: it is published in its project's turn, weighted by
the project's `weight` (domain/flow/fair.py), instead of joining the broker's FIFO behind
another project's backlog.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PACED = "paced AND dispatched_at IS NULL AND status = 'pending'"
IN_FLIGHT = "status = 'pending' AND dispatched_at IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Integer(), server_default="1", nullable=False))
        batch_op.create_check_constraint("weight", "weight BETWEEN 1 AND 1000")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("paced", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.create_index(
        "ix_runs_paced",
        "runs",
        ["queue", "project", "created_at"],
        unique=False,
        postgresql_where=sa.text(PACED),
        sqlite_where=sa.text(PACED),
    )
    op.create_index(
        "ix_runs_in_flight",
        "runs",
        ["queue", "project"],
        unique=False,
        postgresql_where=sa.text(IN_FLIGHT),
        sqlite_where=sa.text(IN_FLIGHT),
    )


def downgrade() -> None:
    # Runs still waiting for their turn are published by the relay once the column is gone:
    # without pacing they are plain unpublished pending runs.
    op.drop_index("ix_runs_in_flight", table_name="runs")
    op.drop_index("ix_runs_paced", table_name="runs")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("paced")
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_projects_weight"), type_="check")
        batch_op.drop_column("weight")
