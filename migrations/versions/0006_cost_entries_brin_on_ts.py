"""cost entries: a BRIN index on ts instead of a B-tree on (project, ts)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 10:35:00

Cost entries are written in batches as often as log lines; a third B-tree made each one cost
the database noticeably more than a line. Reports filter by time (BRIN serves that, entries
arrive in time order) and by project (applied to the rows in range).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cost_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_cost_entries_project_ts")
        batch_op.create_index("ix_cost_entries_ts", ["ts"], unique=False, postgresql_using="brin")


def downgrade() -> None:
    with op.batch_alter_table("cost_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_cost_entries_ts", postgresql_using="brin")
        batch_op.create_index("ix_cost_entries_project_ts", ["project", "ts"], unique=False)
