"""A run's log lines: only while the run exists, in seq order, and deleted with their run."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, delete, func, select

from domain.db import sql
from domain.db.models import run_logs, runs


def lock_for_lines(conn: Connection, run_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Of `run_ids`, the runs that exist, each locked `FOR KEY SHARE` until the transaction
    ends: lines written for them in it cannot outlive them (run_logs has no foreign key; this
    is the lock its check took, once per batch instead of once per line). Locked in id order,
    as every writer locks runs, so two writers never wait on each other in a cycle."""
    if not run_ids:
        return set()
    query = select(runs.c.id).where(runs.c.id.in_(run_ids)).order_by(runs.c.id)
    query = sql.for_update(conn, query, key_share=True, read=True)
    return set(conn.execute(query).scalars())


def delete_runs(conn: Connection, run_ids: Sequence[uuid.UUID]) -> int:
    """Delete runs and their log lines; how many runs. Their other records go by the keys to
    runs (foreign keys on SQLite; on PostgreSQL one statement trigger per delete, 0022).

    The runs first: deleting a row waits for every writer holding it `FOR KEY SHARE`
    (`lock_for_lines`) to commit, so the lines delete that follows sees all their lines, and
    a writer that comes later finds no run and writes nothing. "Sees" needs READ COMMITTED
    (a snapshot per statement): under REPEATABLE READ the lines delete (and 0022's trigger,
    for the other records) would miss rows committed since the transaction began, so callers
    that may find a stricter server default set READ COMMITTED for the transaction
    (`retention.apply_retention` does).
    """
    if not run_ids:
        return 0
    deleted = conn.execute(delete(runs).where(runs.c.id.in_(run_ids))).rowcount
    conn.execute(delete(run_logs).where(run_logs.c.run_id.in_(run_ids)))
    return int(deleted)


def next_seq(conn: Connection, table: Any, run_id: uuid.UUID) -> int:
    """1 + the highest seq a run already has in `table` (run_logs or run_steps)."""
    current = conn.execute(select(func.max(table.c.seq)).where(table.c.run_id == run_id)).scalar()
    return int(current or 0) + 1
