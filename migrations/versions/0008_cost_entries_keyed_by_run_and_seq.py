"""cost entries: keyed by (run_id, seq), numbered by runs.cost_entry_count

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 16:20:00

Cost entries are written as often as log lines, but each one cost the database a sequence
value and two B-tree inserts (the `id` key and the `run_id` index) where a log line costs one.
Keyed like a log line, by (run_id, seq), an entry costs one B-tree insert and no sequence: the
key serves what the run_id index served (the run detail, cascade deletes). The numbers come
from the new runs.cost_entry_count, taken by the UPDATE that adds entries to the run's totals.

Existing entries are numbered per run in their id order, and each run's count is set to match.
On a large cost_entries table the key is rebuilt under a write lock: run this migration in a
quiet moment.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cost_entry_count", sa.BigInteger(), server_default="0", nullable=False)
        )
    op.add_column("cost_entries", sa.Column("seq", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE cost_entries SET seq = numbered.n FROM ("
        " SELECT id, row_number() OVER (PARTITION BY run_id ORDER BY id) AS n FROM cost_entries"
        ") AS numbered WHERE cost_entries.id = numbered.id"
    )
    op.execute(
        "UPDATE runs SET cost_entry_count = counted.n FROM ("
        " SELECT run_id, count(*) AS n FROM cost_entries GROUP BY run_id"
        ") AS counted WHERE runs.id = counted.run_id"
    )
    with op.batch_alter_table("cost_entries", schema=None) as batch_op:
        batch_op.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch_op.drop_index("ix_cost_entries_run_id")
        batch_op.drop_constraint("pk_cost_entries", type_="primary")
        batch_op.drop_column("id")
        batch_op.create_primary_key("pk_cost_entries", ["run_id", "seq"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE cost_entries ADD COLUMN id BIGSERIAL")  # numbers every row
    else:
        op.add_column("cost_entries", sa.Column("id", sa.Integer(), nullable=True))
        op.execute("UPDATE cost_entries SET id = rowid")
    with op.batch_alter_table("cost_entries", schema=None) as batch_op:
        batch_op.drop_constraint("pk_cost_entries", type_="primary")
        batch_op.alter_column(
            "id", existing_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        )
        batch_op.create_primary_key("pk_cost_entries", ["id"])
        batch_op.drop_column("seq")
        batch_op.create_index("ix_cost_entries_run_id", ["run_id"], unique=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("cost_entry_count")
