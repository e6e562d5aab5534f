"""schedule_fires.run_id and webhook_deliveries.run_id indexed

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-03 09:20:00

Both reference runs ON DELETE SET NULL, and neither had an index on run_id: every run deleted
(retention) made PostgreSQL scan every fire and every delivery to find the rows to clear, so
retention slowed down as the history of schedules and webhooks grew. Partial (rows with a run):
a skipped slot has none.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WITH_RUN = "run_id IS NOT NULL"


def upgrade() -> None:
    for table in ("schedule_fires", "webhook_deliveries"):
        op.create_index(
            f"ix_{table}_run_id",
            table,
            ["run_id"],
            unique=False,
            postgresql_where=sa.text(WITH_RUN),
            sqlite_where=sa.text(WITH_RUN),
        )


def downgrade() -> None:
    for table in ("webhook_deliveries", "schedule_fires"):
        op.drop_index(f"ix_{table}_run_id", table_name=table)
