"""Inserting runs on PostgreSQL through psycopg: a batch that carries idempotency keys (one
single-row INSERT prepared once per connection, executed for every row in one pipeline), and a
single run in one round trip (`PgIntake`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import sqltypes

from domain.db.copy import driver_values
from domain.db.driver import ThreadConnections
from domain.db.models import runs
from domain.flow import fair

_KEYED_SQL: dict[tuple[str, ...], str] = {}


def insert_keyed(conn: Connection, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
    """`RunRepository.insert_keyed` on psycopg: one single-row INSERT … RETURNING id, prepared
    once per connection, executed for every row in one pipeline. (SQLAlchemy sends a
    multi-row INSERT whose text differs with the batch's size, which psycopg parses anew
    every time; this costs about half the CPU.)
    Values are passed as the COPY path passes them (`driver_values`).
    """
    names = tuple(rows[0])
    sql = _KEYED_SQL.get(names)
    if sql is None:
        sql = _KEYED_SQL[names] = (
            f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})"
            " ON CONFLICT (project, idempotency_key) WHERE idempotency_key IS NOT NULL"
            " DO NOTHING RETURNING id"
        )
    params = list(driver_values(runs, rows, wrap_json=True))
    inserted: set[uuid.UUID] = set()
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(sql, params, returning=True)
        while True:
            found = cursor.fetchone()
            if found is not None:
                inserted.add(found[0])
            if not cursor.nextset():
                break
    except psycopg.Error as exc:  # as SQLAlchemy raises them: callers handle one kind
        raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
    finally:
        cursor.close()
    return inserted


# -- one run, one round trip ------------------------------------------------------------------
_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def _cast(name: str) -> str:
    """The type a parameter of column `name` is read as (lengths are left to the column, so a
    value too long is an error rather than cut short by the cast)."""
    kind = runs.c[name].type
    affinity = kind._type_affinity
    if affinity is sqltypes.String:
        return "text"
    if affinity is sqltypes.Numeric and not isinstance(kind, sqltypes.Float):
        return "numeric"
    return str(kind.compile(dialect=_PG))


_ONE_SQL: dict[tuple[str, ...], str] = {}

#: Decided in the statement: whether the run waits for its project's turn (domain/flow/fair.py).
_DECIDED = ("paced", "dispatched_at", "dispatch_attempts")


#: Sent even when None: the decided columns (the statement reads them), and those a NULL would
#: not leave as they are (a server default) or that refuse one (the error says which). The
#: other empty columns are left out of the statement: most of a run's are (no idempotency key,
#: budget, parent, ...), and each parameter costs its conversion on both sides.
_KEPT = frozenset(_DECIDED) | {
    c.name for c in runs.c if c.server_default is not None or not c.nullable
}


def _one_sql(names: tuple[str, ...]) -> str:
    """INSERT of one run that, in the same statement, refuses it when its project is at its
    monthly limit (domain/costs/ledger.py `check_can_enqueue`) and paces it when its queue is
    busy (`fair.pace`), and says whether a quarter of the queue's places are free (a top-up is
    due: `fair.top_up_at`); see `PgIntake.insert_one`."""
    given = [n for n in names if n not in _DECIDED]
    values = ", ".join(f"%({n})s::{_cast(n)}" for n in given)
    return f"""
WITH over_limit AS (
  SELECT 1 FROM projects p
  LEFT JOIN project_usage u ON u.project = p.name AND u.month = %(month)s
  WHERE p.name = %(project)s AND (
    (p.monthly_cost_limit_usd IS NOT NULL AND coalesce(u.cost_usd, 0) >= p.monthly_cost_limit_usd)
    OR (p.monthly_token_limit IS NOT NULL AND coalesce(u.tokens, 0) >= p.monthly_token_limit))
), counted AS (
  SELECT
    %(may_pace)s AND EXISTS (
      SELECT 1 FROM runs WHERE queue = %(queue)s AND {fair.WAITING_TURN_SQL}) AS waiting,
    CASE WHEN %(may_pace)s THEN (SELECT count(*) FROM (
      SELECT 1 FROM runs WHERE queue = %(queue)s AND {fair.IN_FLIGHT_SQL} LIMIT %(in_flight)s
    ) f) ELSE 0 END AS flying
), queue AS (
  SELECT waiting, flying >= %(in_flight)s AS full, flying FROM counted
), made AS (
  INSERT INTO runs ({", ".join(given)}, {", ".join(_DECIDED)})
  SELECT {values}, q.waiting OR q.full,
    CASE WHEN q.waiting OR q.full THEN NULL ELSE %(dispatched_at)s::timestamptz END,
    CASE WHEN q.waiting OR q.full THEN 0 ELSE %(dispatch_attempts)s::int4 END
  FROM queue q WHERE NOT EXISTS (SELECT 1 FROM over_limit)
  ON CONFLICT (project, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
  RETURNING paced
)
SELECT EXISTS (SELECT 1 FROM over_limit), (SELECT paced FROM made),
  %(in_flight)s - q.flying >= %(top_up_at)s FROM queue q
"""


@dataclass(frozen=True, slots=True)
class Inserted:
    """What the single insert did: `made` the run (else: its project is at its monthly limit,
    or its idempotency key names another run: the general path says which); `paced` it waits
    for a turn; `turns` a quarter of the queue's places were free, so turns may go out now."""

    made: bool
    paced: bool
    turns: bool


class PgIntake:
    """`enqueue` of one run as one prepared statement on a connection of the caller's thread
    (domain/db/driver.py): the project-limit check, the pacing decision and the INSERT in one
    round trip, its own transaction (autocommit), instead of BEGIN, two reads, the INSERT and
    COMMIT. domain/runs/enqueue.py sends only the plain case here (one run, no rate limit to
    check, no rows to write beside it) and everything this cannot answer to the general path."""

    def __init__(self, connections: ThreadConnections) -> None:
        self._connections = connections

    def insert_one(self, row: dict[str, Any], *, month: date, in_flight: int) -> Inserted:
        given = {name: value for name, value in row.items() if value is not None or name in _KEPT}
        names = tuple(given)
        sql = _ONE_SQL.get(names)
        if sql is None:
            sql = _ONE_SQL[names] = _one_sql(names)
        params = dict(zip(names, next(driver_values(runs, [given], wrap_json=True)), strict=True))
        params.update(
            month=month,
            may_pace=in_flight > 0 and row["dispatched_at"] is not None,
            in_flight=max(in_flight, 1),
            top_up_at=fair.top_up_at(max(in_flight, 1)),
        )
        with self._connections.connection() as raw:
            over, paced, roomy = raw.execute(sql, params, prepare=True).fetchone() or (0, 0, 0)
        if over or paced is None:
            return Inserted(made=False, paced=False, turns=False)
        if paced:
            row.update(paced=True, dispatched_at=None, dispatch_attempts=0)
        return Inserted(made=True, paced=bool(paced), turns=bool(paced) and bool(roomy))
