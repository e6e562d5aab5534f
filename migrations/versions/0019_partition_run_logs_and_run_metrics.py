"""run_logs and run_metrics partitioned by day of their run's id, on PostgreSQL

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03 09:00:00

Both tables become `PARTITION BY RANGE (run_id)`, one partition per UTC day, and a DEFAULT
partition as a safety net. A run id is a uuid7: its first 48 bits are the millisecond it was
made, and uuids compare byte by byte, so the ids of one day are one range. That is partitioning
by time (the run's creation time), chosen over the lines' own `ts` because:
- every line and metric of a run is in one partition, so a partition can be dropped exactly
  when every run made that day is gone (domain/housekeeping/partitions.py), and a run's lines
  are found by one index probe in one partition, never one probe per partition;
- the keys stay what they were: (run_id, seq) already holds the partition key, so a line's
  seq stays unique per run; run_metrics' key becomes (id, run_id) (id alone stays unique: a
  sequence hands it out).
Daily, because retention ages are days: a day's partition goes about a day after the last of
its runs passes its cutoff, and a year kept is about 365 partitions, which every hot read
prunes to one (they all name the run id).

`conveyor_ensure_partition(table, day)` makes a day's partition if it is missing (moving that
day's rows out of the DEFAULT partition first, so it can always be attached); the migration
makes one for every day that has runs, and for yesterday through a week ahead; the scheduler's
housekeeping keeps a week ahead from then on. Rows of an id no partition covers (a run id that
is not a uuid7, or a day nobody made) land in DEFAULT, which the next housekeeping pass empties
into its day's partitions.

Upgrading copies both tables (writes to them wait until it commits): on a large installation,
migrate in a quiet moment. Downgrading copies them back into plain tables. SQLite: no change.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Days ahead the migration makes partitions for (housekeeping keeps the same window).
AHEAD_DAYS = 7

FUNCTIONS = """
CREATE OR REPLACE FUNCTION conveyor_run_id_floor(p_day date) RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$
  SELECT (lpad(to_hex((extract(epoch FROM p_day::timestamp) * 1000)::bigint), 12, '0')
          || '00000000000000000000')::uuid
$$;

CREATE OR REPLACE FUNCTION conveyor_run_id_day(p_id uuid) RETURNS date
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN substr(p_id::text, 15, 1) = '7' THEN
    (to_timestamp(('x' || substr(replace(p_id::text, '-', ''), 1, 12))::bit(48)::bigint
                  / 1000.0) AT TIME ZONE 'UTC')::date
  END
$$;

CREATE OR REPLACE FUNCTION conveyor_ensure_partition(p_table text, p_day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  part text := p_table || '_p' || to_char(p_day, 'YYYYMMDD');
  lo uuid := conveyor_run_id_floor(p_day);
  hi uuid := conveyor_run_id_floor(p_day + 1);
BEGIN
  -- One maker at a time (the migration, a scheduler leader, a bench): the check and the
  -- attach below must not interleave with another's.
  PERFORM pg_advisory_xact_lock(hashtextextended('conveyor_partitions', 0));
  IF to_regclass(part) IS NOT NULL THEN
    RETURN false;
  END IF;
  EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                 part, p_table);
  -- ATTACH refuses a range the DEFAULT partition holds rows of: those rows move first.
  IF to_regclass(p_table || '_default') IS NOT NULL THEN
    EXECUTE format('WITH moved AS (DELETE FROM %I WHERE run_id >= $1 AND run_id < $2 '
                   'RETURNING *) INSERT INTO %I SELECT * FROM moved',
                   p_table || '_default', part) USING lo, hi;
  END IF;
  EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                 p_table, part, lo, hi);
  RETURN true;
END
$$;
"""

DROP_FUNCTIONS = """
DROP FUNCTION IF EXISTS conveyor_ensure_partition(text, date);
DROP FUNCTION IF EXISTS conveyor_run_id_day(uuid);
DROP FUNCTION IF EXISTS conveyor_run_id_floor(date);
"""


def _partitioned() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if not _partitioned():
        return  # SQLite keeps plain tables: dev mode's history is small
    op.execute(FUNCTIONS)
    for table in ("run_logs", "run_metrics"):
        op.execute(f"ALTER TABLE {table} RENAME TO {table}_plain")
        op.execute(f"ALTER TABLE {table}_plain RENAME CONSTRAINT pk_{table} TO pk_{table}_plain")
        op.execute(
            f"CREATE TABLE {table} (LIKE {table}_plain INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            " PARTITION BY RANGE (run_id)"
        )
    op.execute("ALTER TABLE run_logs ADD CONSTRAINT pk_run_logs PRIMARY KEY (run_id, seq)")
    op.execute("ALTER TABLE run_metrics ADD CONSTRAINT pk_run_metrics PRIMARY KEY (id, run_id)")
    op.execute("ALTER INDEX ix_run_metrics_run_id RENAME TO ix_run_metrics_plain_run_id")
    op.execute("CREATE INDEX ix_run_metrics_run_id ON run_metrics (run_id)")
    # The id sequence belongs to the column that uses it, or it goes with the old table.
    op.execute("ALTER SEQUENCE run_metrics_id_seq OWNED BY run_metrics.id")
    _make_partitions()
    for table in ("run_logs", "run_metrics"):
        op.execute(f"INSERT INTO {table} SELECT * FROM {table}_plain")
        op.execute(f"DROP TABLE {table}_plain")
        op.execute(f"ANALYZE {table}")
    # After the copy: the rows are checked against runs once, not one at a time.
    op.execute(
        "ALTER TABLE run_metrics ADD CONSTRAINT fk_run_metrics_run_id_runs FOREIGN KEY (run_id)"
        " REFERENCES runs (id) ON DELETE CASCADE"
    )


def _make_partitions() -> None:
    """A partition for every day that has runs (their lines and metrics go there), and for
    yesterday through AHEAD_DAYS ahead; everything else lands in DEFAULT."""
    days = f"""
        SELECT DISTINCT conveyor_run_id_day(id) AS day FROM runs
        WHERE conveyor_run_id_day(id) BETWEEN DATE '2000-01-01'
              AND (now() AT TIME ZONE 'UTC')::date + {AHEAD_DAYS}
        UNION
        SELECT (now() AT TIME ZONE 'UTC')::date + n FROM generate_series(-1, {AHEAD_DAYS}) n
    """
    for table in ("run_logs", "run_metrics"):
        op.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")
        op.execute(f"SELECT conveyor_ensure_partition('{table}', day) FROM ({days}) d")


def downgrade() -> None:
    if not _partitioned():
        return
    for table in ("run_logs", "run_metrics"):
        op.execute(f"ALTER TABLE {table} RENAME TO {table}_parted")
        op.execute(f"ALTER TABLE {table}_parted RENAME CONSTRAINT pk_{table} TO pk_{table}_parted")
        op.execute(
            f"CREATE TABLE {table} (LIKE {table}_parted INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
    op.execute("ALTER TABLE run_logs ADD CONSTRAINT pk_run_logs PRIMARY KEY (run_id, seq)")
    op.execute("ALTER TABLE run_metrics ADD CONSTRAINT pk_run_metrics PRIMARY KEY (id)")
    op.execute("ALTER INDEX ix_run_metrics_run_id RENAME TO ix_run_metrics_parted_run_id")
    op.execute("ALTER SEQUENCE run_metrics_id_seq OWNED BY run_metrics.id")
    for table in ("run_logs", "run_metrics"):
        op.execute(f"INSERT INTO {table} SELECT * FROM {table}_parted")
        op.execute(f"DROP TABLE {table}_parted")  # and its partitions
    op.execute("CREATE INDEX ix_run_metrics_run_id ON run_metrics (run_id)")
    op.execute(
        "ALTER TABLE run_metrics ADD CONSTRAINT fk_run_metrics_run_id_runs FOREIGN KEY (run_id)"
        " REFERENCES runs (id) ON DELETE CASCADE"
    )
    op.execute(DROP_FUNCTIONS)
