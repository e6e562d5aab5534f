"""projects.on_limit: what a run does when its project is at a monthly limit at claim

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 00:40:00

The claim now checks the project's month before a run starts: `stop` (the default, and what
every existing project gets) ends the run `budget_exceeded` without spending; `hold` keeps it
pending and re-checks it later. A column with a server default: PostgreSQL adds it without
rewriting the table; SQLite goes through a batch copy of the (small) projects table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("on_limit", sa.String(length=8), server_default="stop", nullable=False)
        )
        batch_op.create_check_constraint("on_limit", "on_limit IN ('stop', 'hold')")


def downgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_projects_on_limit"), type_="check")
        batch_op.drop_column("on_limit")
