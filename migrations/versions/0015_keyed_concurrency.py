"""runs: concurrency_key and concurrency_max, for keyed concurrency

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 07:20:00

`@task(concurrency=Limit(key="{repo}:{branch}", max=1))`: a run's key and its max are
written when it is created; at most `max` runs with one key run at once, the others wait
(reason `concurrency:<key>`, so wait_reason grows to hold a key of up to 200 characters).
A partial index over keyed runs serves the gate's count of a key's holders and waiters.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYED = "concurrency_key IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("concurrency_key", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("concurrency_max", sa.Integer(), nullable=True))
        batch_op.alter_column(
            "wait_reason",
            existing_type=sa.String(length=100),
            type_=sa.String(length=255),
            existing_nullable=True,
        )
        batch_op.create_index(
            "ix_runs_concurrency_key",
            ["concurrency_key", "status", "created_at"],
            unique=False,
            postgresql_where=sa.text(KEYED),
            sqlite_where=sa.text(KEYED),
        )


def downgrade() -> None:
    # A run waiting for a slot goes back to pending (delivered at its wake time, within
    # concurrency.NET_S): without keys it simply runs then. One that never started gives back
    # the attempt the gate opened.
    slot_waiters = "status = 'waiting' AND wait_reason LIKE 'concurrency:%'"
    op.execute(f"UPDATE runs SET attempt = attempt - 1 WHERE {slot_waiters} AND started_at IS NULL")
    op.execute(
        f"UPDATE runs SET status = 'pending', wait_reason = NULL, dispatched_at = NULL "
        f"WHERE {slot_waiters}"
    )
    op.execute("UPDATE runs SET wait_reason = substr(wait_reason, 1, 100)")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_concurrency_key")
        batch_op.alter_column(
            "wait_reason",
            existing_type=sa.String(length=255),
            type_=sa.String(length=100),
            existing_nullable=True,
        )
        batch_op.drop_column("concurrency_max")
        batch_op.drop_column("concurrency_key")
