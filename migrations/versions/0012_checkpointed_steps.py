"""run_steps: occurrence, result and tries, for checkpointed steps

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 04:00:00

`ctx.step(name, fn)` stores its result with the step: a later attempt of the run finds the
step completed and returns the result instead of calling `fn` again. A checkpointed step is
identified by its name and occurrence (the n-th step of that name in the run), unique per run;
visible steps (`with ctx.step(name):`) keep occurrence NULL and are not in the index. Nullable
columns and one with a server default: PostgreSQL adds them without rewriting the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("run_steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("occurrence", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "result",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("tries", sa.Integer(), server_default="1", nullable=False))
        batch_op.create_index(
            "uq_run_steps_occurrence",
            ["run_id", "name", "occurrence"],
            unique=True,
            postgresql_where=sa.text("occurrence IS NOT NULL"),
            sqlite_where=sa.text("occurrence IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("run_steps", schema=None) as batch_op:
        batch_op.drop_index("uq_run_steps_occurrence")
        batch_op.drop_column("tries")
        batch_op.drop_column("result")
        batch_op.drop_column("occurrence")
