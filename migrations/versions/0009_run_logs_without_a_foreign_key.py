"""run_logs: no foreign key to runs; writers lock the runs once per batch instead

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 21:50:00

PostgreSQL checks a foreign key once per inserted row, with a query and a row lock on the run.
For log lines, written by the hundred thousand per second, that check was two thirds of the
database's work: a COPY of 300,000 lines took 6.3 us a line with the key and 2.3 us without it
(on the same table and index). The writers now take the same lock (`FOR KEY SHARE` on the
runs) once per batch and drop lines whose run no longer exists, and deleting runs deletes their
lines in the same transaction (`domain.runs.lines.delete_runs`), so no line outlives its run either way.

Upgrading only drops the constraint (a brief lock, no scan). Downgrading deletes any line whose
run is gone, then puts the key back, which checks every line against runs while writes to both
tables wait: on a large run_logs, downgrade in a quiet moment.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_run_logs_run_id_runs"


def upgrade() -> None:
    with op.batch_alter_table("run_logs", schema=None) as batch_op:
        batch_op.drop_constraint(FK, type_="foreignkey")


def downgrade() -> None:
    # NOT EXISTS, not NOT IN: an anti join, where NOT IN re-scans runs per line once the run
    # ids outgrow work_mem.
    op.execute(
        "DELETE FROM run_logs WHERE NOT EXISTS (SELECT 1 FROM runs WHERE runs.id = run_logs.run_id)"
    )
    with op.batch_alter_table("run_logs", schema=None) as batch_op:
        batch_op.create_foreign_key(FK, "runs", ["run_id"], ["id"], ondelete="CASCADE")
