"""The keys to runs checked by triggers, and a delete's records removed per statement, on
PostgreSQL

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-04 18:30:00

PostgreSQL carries out a foreign key's ON DELETE action once per deleted row per referencing
table: deleting one day's runs (5,000) spent 620 of its 652 ms in those triggers, one query per
run for each of the ten tables that reference runs (run_metrics, partitioned, alone 224 ms).
Retention deletes runs by the thousand, so the ten keys become triggers that do the same work
once per statement:
- on each referencing table, a row trigger after INSERT and UPDATE OF its run column checks
  that the run exists and locks it `FOR KEY SHARE`, the probe and lock PostgreSQL's own check
  takes, at the end of the statement as its check does (a statement may insert a run and a
  run pointing at it in any order; and a COPY keeps inserting rows in batches, which a BEFORE
  trigger would stop): a delete of that run waits for the writer to commit (and then removes what it wrote),
  or has committed (and the writer finds no run). A missing run raises SQLSTATE 23503 with
  PostgreSQL's own message, so callers catching IntegrityError see what they saw before;
- on runs, one statement trigger after DELETE deletes the records of every deleted run
  (the keys that were ON DELETE CASCADE) and clears the links to them (SET NULL), one
  statement per table over the deleted ids (the transition table `gone`). All ten keys were
  CASCADE or SET NULL: none refused a delete, so none has to refuse now;
- a change of runs.id is refused (the keys were ON UPDATE NO ACTION, and no code changes ids);
- TRUNCATE runs is refused while a referencing table still holds a row that points at a run:
  name those tables in the same TRUNCATE (`CASCADE` no longer reaches them).

Like `lines.delete_runs`, the delete trigger sees records committed by others while it ran
only under READ COMMITTED (a snapshot per statement); retention sets it for its transactions.
Under REPEATABLE READ, a record written for a run while a transaction deleting that run waited
would outlive its run; PostgreSQL's own keys check with a newer snapshot there.

Upgrading creates the functions and triggers and drops the keys: brief locks, no scan.
Downgrading removes what no trigger stopped (records of runs that are gone, which only a path
that skips triggers can leave: session_replication_role = replica, disabled triggers), then
puts the keys back as they were, checking every row while writes wait: on a large history,
downgrade in a quiet moment. SQLite keeps its keys: no change there.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (table, column, ON DELETE action) of every key to runs.id this revision replaces.
KEYS = (
    ("cost_entries", "run_id", "CASCADE"),
    ("cost_reservations", "run_id", "CASCADE"),
    ("outbound_deliveries", "run_id", "CASCADE"),
    ("run_artifacts", "run_id", "CASCADE"),
    ("run_metrics", "run_id", "CASCADE"),
    ("run_signals", "run_id", "CASCADE"),
    ("run_steps", "run_id", "CASCADE"),
    ("runs", "parent_run_id", "SET NULL"),
    ("schedule_fires", "run_id", "SET NULL"),
    ("webhook_deliveries", "run_id", "SET NULL"),
)


def _name(table: str, column: str) -> str:
    return f"fk_{table}_{column}_runs"


def _definition(column: str, action: str) -> str:
    return f"FOREIGN KEY ({column}) REFERENCES runs(id) ON DELETE {action}"


def _check_function(column: str) -> str:
    """The insert/update check for a table whose key column is `column` (the constraint's
    name is the trigger's argument, for the message)."""
    return f"""
CREATE FUNCTION conveyor_check_{column}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM FROM runs WHERE id = NEW.{column} FOR KEY SHARE;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING
      ERRCODE = 'foreign_key_violation',
      MESSAGE = format('insert or update on table "%s" violates foreign key constraint "%s"',
                       TG_TABLE_NAME, TG_ARGV[0]),
      DETAIL = format('Key ({column})=(%s) is not present in table "runs".', NEW.{column}),
      SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = '{column}',
      CONSTRAINT = TG_ARGV[0];
  END IF;
  RETURN NULL;
END
$$;
"""


def _deleted_function() -> str:
    actions = []
    for table, column, action in KEYS:
        gone = f"{column} IN (SELECT id FROM gone)"
        if action == "CASCADE":
            actions.append(f"  DELETE FROM {table} WHERE {gone};")
        else:
            actions.append(f"  UPDATE {table} SET {column} = NULL WHERE {gone};")
    body = "\n".join(actions)
    return f"""
CREATE FUNCTION conveyor_runs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- A statement trigger fires for a delete that matched nothing too.
  IF NOT EXISTS (SELECT FROM gone) THEN
    RETURN NULL;
  END IF;
{body}
  RETURN NULL;
END
$$;
"""


def _truncated_function() -> str:
    checks = []
    for table, column, _ in KEYS:
        if table == "runs":
            continue
        checks.append(f"""
  IF EXISTS (SELECT FROM {table} WHERE {column} IS NOT NULL) THEN
    RAISE EXCEPTION USING
      ERRCODE = 'feature_not_supported',
      MESSAGE = 'cannot truncate a table referenced in a foreign key constraint',
      DETAIL = 'Table "{table}" references "runs".',
      HINT = 'Truncate table "{table}" at the same time.';
  END IF;""")
    return f"""
CREATE FUNCTION conveyor_runs_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN{"".join(checks)}
  RETURN NULL;
END
$$;
"""


ID_FIXED = """
CREATE FUNCTION conveyor_run_id_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION USING
    ERRCODE = 'foreign_key_violation',
    MESSAGE = 'update on table "runs" changes a run''s id, which its records refer to',
    DETAIL = format('Key (id)=(%s) may not change.', OLD.id),
    SCHEMA = TG_TABLE_SCHEMA, TABLE = TG_TABLE_NAME, COLUMN = 'id';
END
$$;
"""

FUNCTIONS = ("conveyor_runs_deleted", "conveyor_runs_truncated", "conveyor_run_id_fixed")


def _keyed() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if not _keyed():
        return  # SQLite checks a key in the same loop as the delete: nothing to gain
    _expect_keys()
    for column in sorted({column for _, column, _ in KEYS}):
        op.execute(_check_function(column))
    op.execute(_deleted_function())
    op.execute(_truncated_function())
    op.execute(ID_FIXED)
    # The checks first, then the keys go: no moment where a row goes unchecked. On the
    # partitioned run_metrics the trigger is cloned onto every partition, and onto each one
    # attached later (conveyor_ensure_partition attaches the partitions it makes).
    for table, column, _ in KEYS:
        op.execute(
            f"CREATE TRIGGER {table}_{column}_key AFTER INSERT OR UPDATE OF {column}"
            f" ON {table} FOR EACH ROW WHEN (NEW.{column} IS NOT NULL)"
            f" EXECUTE FUNCTION conveyor_check_{column}('{_name(table, column)}')"
        )
    op.execute(
        "CREATE TRIGGER runs_deleted AFTER DELETE ON runs REFERENCING OLD TABLE AS gone"
        " FOR EACH STATEMENT EXECUTE FUNCTION conveyor_runs_deleted()"
    )
    op.execute(
        "CREATE TRIGGER runs_truncated AFTER TRUNCATE ON runs"
        " FOR EACH STATEMENT EXECUTE FUNCTION conveyor_runs_truncated()"
    )
    op.execute(
        "CREATE TRIGGER runs_id_fixed BEFORE UPDATE OF id ON runs FOR EACH ROW"
        " WHEN (NEW.id IS DISTINCT FROM OLD.id) EXECUTE FUNCTION conveyor_run_id_fixed()"
    )
    for table, column, _ in KEYS:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {_name(table, column)}")


def _expect_keys() -> None:
    """Each key is there as 0001-0020 made it: the triggers do what these keys did, and no
    more (a key changed by hand would be replaced by something else than it is)."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE contype = 'f' AND conparentid = 0 AND confrelid = 'runs'::regclass"
        )
    )
    found = {name: definition for name, definition in rows}
    for table, column, action in KEYS:
        name = _name(table, column)
        if found.get(name) != _definition(column, action):
            raise RuntimeError(
                f"{name}: expected {_definition(column, action)!r}, found {found.get(name)!r}"
            )


def downgrade() -> None:
    if not _keyed():
        return
    for table, column, _ in KEYS:
        op.execute(f"DROP TRIGGER {table}_{column}_key ON {table}")
    for trigger in ("runs_deleted", "runs_truncated", "runs_id_fixed"):
        op.execute(f"DROP TRIGGER {trigger} ON runs")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}()")
    for column in sorted({column for _, column, _ in KEYS}):
        op.execute(f"DROP FUNCTION conveyor_check_{column}()")
    for table, column, action in KEYS:
        # What the key would have done had it seen its run go. NOT EXISTS: an anti join.
        orphan = f"NOT EXISTS (SELECT FROM runs r WHERE r.id = t.{column})"
        if action == "CASCADE":
            op.execute(f"DELETE FROM {table} t WHERE {orphan}")
        else:
            op.execute(
                f"UPDATE {table} t SET {column} = NULL WHERE t.{column} IS NOT NULL AND {orphan}"
            )
        op.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT {_name(table, column)}"
            f" {_definition(column, action).replace('runs(id)', 'runs (id)')}"
        )
