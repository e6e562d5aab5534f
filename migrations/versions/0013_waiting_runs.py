"""runs: the waiting state and wait_reason, for runs that sleep without holding a worker

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 04:10:00

`ctx.sleep("10m")` ends the execution without ending the run: it waits in `waiting` (reason
`sleep`) until `not_before`, holding no worker and no lease, and the relay delivers it again
when it is due. The status check gains `waiting`; a partial index serves the relay's sweep
for waiting runs as `ix_runs_pending_due` serves it for pending ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = (
    "status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', "
    "'timed_out', 'budget_exceeded')"
)
AFTER = (
    "status IN ('pending', 'running', 'waiting', 'succeeded', 'failed', 'cancelled', "
    "'timed_out', 'budget_exceeded')"
)


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("wait_reason", sa.String(length=100), nullable=True))
        batch_op.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch_op.create_check_constraint("status", AFTER)
        batch_op.create_index(
            "ix_runs_waiting_due",
            ["not_before"],
            unique=False,
            postgresql_where=sa.text("status = 'waiting'"),
            sqlite_where=sa.text("status = 'waiting'"),
        )


def downgrade() -> None:
    # A waiting run becomes pending: the relay delivers it when due, and it runs from the top.
    op.execute("UPDATE runs SET status = 'pending' WHERE status = 'waiting'")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_waiting_due")
        batch_op.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch_op.create_check_constraint("status", BEFORE)
        batch_op.drop_column("wait_reason")
