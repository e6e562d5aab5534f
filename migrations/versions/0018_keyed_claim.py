"""keyed concurrency on PostgreSQL in one round trip: the gate and the hand-over as functions

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03 09:20:00

A keyed run's claim and finish went through several statements each, built by SQLAlchemy in
an explicit transaction (lock the key, count the holders, count the waiters ahead, claim; on
finish lock, count, count, update). On PostgreSQL the rule of domain/flow/concurrency.py is
now two functions, so the worker's prepared claim and finish (domain/runs/store_pg.py) take a
keyed run as they take any other:
- `conveyor_key_has_room(run, key, max, created_at, now)`: with the key's lock held until the
  calling statement's transaction ends, whether fewer than `max` other runs hold the key or
  wait for it ahead of this one (`gate`);
- `conveyor_key_refill(key, max, now, publishing, ended)`: with the lock held, make the
  oldest waiters due, as many as slots are free, and return them (`refill`). `ended`: a run
  that stops holding the key in the calling statement itself (the prepared finish), which the
  function's own snapshot may not see yet, so it is not counted as a holder.
Each statement inside a (volatile) function reads a fresh snapshot, so the counts taken after
the lock see every claim and finish that committed before it was granted. SQLite keeps the
portable path. Nothing else changes: no table, no data.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The lock sql.lock_key takes for the key (domain/db/sql.py).
_LOCK = "PERFORM pg_advisory_xact_lock(hashtextextended('concurrency:' || p_key, 0));"
#: The key's live rows, one scan of ix_runs_concurrency_key; within them, its holders and its
#: waiters (the wait reason tells a waiter for the key from a run parked for something else).
_KEYED = "r.concurrency_key = p_key AND r.status IN ('running', 'waiting')"
_HOLDER = "r.status = 'running' AND r.lease_expires_at >= p_now"
_WAITER = "r.status = 'waiting' AND r.wait_reason = 'concurrency:' || p_key"

HAS_ROOM = f"""
CREATE OR REPLACE FUNCTION conveyor_key_has_room(
    p_id uuid, p_key text, p_most integer, p_created timestamptz, p_now timestamptz
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    holders bigint;
    ahead bigint;
BEGIN
    {_LOCK}
    SELECT count(*) FILTER (WHERE {_HOLDER}),
           count(*) FILTER (WHERE {_WAITER} AND (r.created_at, r.id) < (p_created, p_id))
      INTO holders, ahead
      FROM runs r WHERE {_KEYED} AND r.id <> p_id;
    RETURN holders + ahead < coalesce(p_most, 1);
END
$$;
"""

REFILL = f"""
CREATE OR REPLACE FUNCTION conveyor_key_refill(
    p_key text, p_most integer, p_now timestamptz, p_publishing boolean, p_ended uuid DEFAULT NULL
) RETURNS TABLE (id uuid, name varchar, queue varchar, params jsonb)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    holders bigint;
    due bigint;
    idle bigint;
BEGIN
    {_LOCK}
    SELECT count(*) FILTER (WHERE {_HOLDER} AND r.id IS DISTINCT FROM p_ended),
           count(*) FILTER (WHERE {_WAITER} AND r.not_before <= p_now),
           count(*) FILTER (WHERE {_WAITER} AND r.not_before > p_now)
      INTO holders, due, idle
      FROM runs r WHERE {_KEYED};
    IF idle = 0 OR coalesce(p_most, 1) - holders - due <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE runs u SET not_before = p_now,
        dispatched_at = CASE WHEN p_publishing THEN p_now END,
        dispatch_attempts = u.dispatch_attempts + CASE WHEN p_publishing THEN 1 ELSE 0 END
     WHERE u.id IN (
        SELECT r.id FROM runs r WHERE {_KEYED} AND {_WAITER} AND r.not_before > p_now
         ORDER BY r.created_at, r.id LIMIT coalesce(p_most, 1) - holders - due)
    RETURNING u.id, u.name, u.queue, u.params;
END
$$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(HAS_ROOM)
        op.execute(REFILL)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION IF EXISTS conveyor_key_refill(text, integer, timestamptz, boolean)"
        )
        op.execute(
            "DROP FUNCTION IF EXISTS conveyor_key_has_room(uuid, text, integer, timestamptz, "
            "timestamptz)"
        )
