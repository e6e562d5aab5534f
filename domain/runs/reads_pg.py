"""RunReads on PostgreSQL, on the driver directly: the runs page, a run's detail and its last
log lines, and the webhook intake's endpoint lookup.

Dashboards poll these. Through SQLAlchemy most of a page's CPU goes to a pool checkout with its
pre-ping round trip, a statement cache lookup, and a result processor for each column of each
row (bench/RESULTS.md has the figures). Here:
- the SQL text is fixed per combination of filters and prepared once per connection;
- rows come back as tuples in RunView's field order, timestamps already in UTC (the session's
  TimeZone), and become views positionally;
- a detail's three statements (the run with its log line count, its steps, its spend per
  provider and model) go in one pipeline: one round trip;
- connections come from a pool of their own in autocommit mode, with no ping on checkout: a
  read that meets a connection the server dropped (a restart) empties the pool's idle
  connections and is tried once more on a new one.

Same results as the portable `SqlRunReads` (domain/runs/reads.py), which SQLite and other
drivers use; tests/integration/test_run_reads_contract.py holds both to the same answers.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypeVar, cast

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

from domain.db.engine import describe_db_error, libpq_conninfo
from domain.errors import DatabaseUnavailable, RunNotFound
from domain.runs.reads import CostLine, RunDetail
from domain.runs.repository import (
    RunFilter,
    check_page_limit,
    decode_cursor,
    like_pattern,
    page_of,
)
from domain.runs.views import LogLine, Page, RunView, StepView

T = TypeVar("T")

#: How long a read waits for a free connection before answering 503.
CHECKOUT_TIMEOUT_S = 10

_RUN_COLUMNS = ", ".join(f"r.{name}" for name in RunView.field_names())

# The log count names the id itself, not r.id: run_logs is partitioned by run id (migration
# 0019), and a parameter prunes the count to the run's one partition where a correlated column
# would plan (and lock) every partition on every read.
_DETAIL_RUN_SQL = f"""
SELECT {_RUN_COLUMNS}, (SELECT count(*) FROM run_logs l WHERE l.run_id = %(id)s)
FROM runs r WHERE r.id = %(id)s
"""

_DETAIL_STEPS_SQL = """
SELECT seq, attempt, name, step_type, status, detail, started_at, finished_at, occurrence, tries,
  (SELECT coalesce(sum(c.cost_usd), 0) FROM cost_entries c
   WHERE c.run_id = s.run_id AND c.step_seq = s.seq)
FROM run_steps s WHERE run_id = %s ORDER BY seq
"""

# Sorted as Python sorts (provider, model) tuples: by code point, whatever the database's
# collation.
_DETAIL_COSTS_SQL = """
SELECT provider, model, sum(tokens_in)::int8, sum(tokens_out)::int8, sum(requests)::int8,
  sum(cost_usd)
FROM cost_entries WHERE run_id = %s
GROUP BY provider, model ORDER BY provider COLLATE "C", model COLLATE "C"
"""


_EXISTS_SQL = "SELECT 1 FROM runs WHERE id = %s"

# The run id as a parameter: one partition of run_logs, its key read backwards.
_LAST_LINES_SQL = """
SELECT seq, attempt, ts, stream, level, message, fields FROM run_logs
WHERE run_id = %s ORDER BY seq DESC LIMIT %s
"""

# The webhook intake's lookup, once per batch of deliveries.
_WEBHOOKS_SQL = """
SELECT id, name, project, target_kind, target_name, enabled, created_at, secret_ciphertext
FROM webhooks WHERE name = ANY(%s) AND enabled
"""


def page_query(filters: RunFilter, limit: int, cursor: str | None) -> tuple[str, dict[str, Any]]:
    """The SQL for one page (its text depends only on which filters are set) and its values."""
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit + 1}
    for key, value, condition in (
        ("status", list(filters.status), "status = ANY(%(status)s)"),
        ("name", filters.name, "name = %(name)s"),
        ("project", filters.project, "project = %(project)s"),
        ("queue", filters.queue, "queue = %(queue)s"),
        ("after", filters.created_after, "created_at >= %(after)s"),
        ("before", filters.created_before, "created_at < %(before)s"),
        ("error", filters.error and like_pattern(filters.error), "error ILIKE %(error)s"),
        ("ids", list(filters.ids), "id = ANY(%(ids)s)"),
    ):
        if value:
            where.append(condition)
            params[key] = value
    if cursor:
        params["cursor_at"], params["cursor_id"] = decode_cursor(cursor)
        where.append("(created_at, id) < (%(cursor_at)s, %(cursor_id)s)")
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    sql = (
        f"SELECT {_RUN_COLUMNS} FROM runs r {clause}"
        "ORDER BY created_at DESC, id DESC LIMIT %(limit)s"
    )
    return sql, params


def utc_session(conninfo: str) -> str:
    """`conninfo` whose sessions report timestamps in UTC, keeping any options it has."""
    options = conninfo_to_dict(conninfo).get("options")
    utc = "-c TimeZone=UTC"
    return make_conninfo(conninfo, options=f"{options} {utc}" if options else utc)


class PgReads:
    """The runs page and run detail for the API, on a small pool of its own connections."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self._url = url
        conninfo = utc_session(libpq_conninfo(url))

        def connect() -> Any:
            return psycopg.connect(conninfo, autocommit=True)

        self._pool = QueuePool(
            connect,
            pool_size=pool_size,
            max_overflow=3 * pool_size,  # the API's threadpool may read with up to 40 threads
            timeout=CHECKOUT_TIMEOUT_S,
            reset_on_return=None,  # autocommit: there is never a transaction to end
        )

    def close(self) -> None:
        self._pool.dispose()

    def page(self, filters: RunFilter, *, limit: int = 50, cursor: str | None = None) -> Page:
        check_page_limit(limit)
        sql, params = page_query(filters, limit, cursor)
        rows = self._read(lambda conn: conn.execute(sql, params, prepare=True).fetchall())
        return page_of([RunView(*row) for row in rows], limit)

    def detail(self, run_id: uuid.UUID) -> RunDetail:
        def read(conn: psycopg.Connection[Any]) -> tuple[Any, list[Any], list[Any]]:
            with conn.pipeline():
                run = conn.execute(_DETAIL_RUN_SQL, {"id": run_id}, prepare=True)
                steps = conn.execute(_DETAIL_STEPS_SQL, (run_id,), prepare=True)
                costs = conn.execute(_DETAIL_COSTS_SQL, (run_id,), prepare=True)
            return run.fetchone(), steps.fetchall(), costs.fetchall()

        row, steps, costs = self._read(read)
        if row is None:
            raise RunNotFound(f"no run with id {run_id}", run_id=str(run_id))
        return RunDetail(
            run=RunView(*row[:-1]),
            steps=[StepView(*step) for step in steps],
            log_lines=row[-1],
            costs=[CostLine(*cost) for cost in costs],
        )

    def last_lines(self, run_id: uuid.UUID, *, limit: int = 200) -> list[LogLine]:
        def read(conn: psycopg.Connection[Any]) -> tuple[Any, list[Any]]:
            with conn.pipeline():
                run = conn.execute(_EXISTS_SQL, (run_id,), prepare=True)
                lines = conn.execute(_LAST_LINES_SQL, (run_id, limit), prepare=True)
            return run.fetchone(), lines.fetchall()

        found, rows = self._read(read)
        if found is None:
            raise RunNotFound(f"no run with id {run_id}", run_id=str(run_id))
        return [LogLine(*row) for row in reversed(rows)]

    def webhook_rows(self, names: list[str]) -> list[dict[str, Any]]:
        """The enabled webhooks among `names`, each a row by column name, secret still
        encrypted (`webhooks.endpoints_of` makes them endpoints)."""

        def read(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            with conn.cursor(row_factory=dict_row) as cur:
                return cur.execute(_WEBHOOKS_SQL, (names,), prepare=True).fetchall()

        return self._read(read)

    def _read(self, read: Callable[[psycopg.Connection[Any]], T]) -> T:
        for attempt in (1, 2):
            pool = self._pool
            try:
                pooled = pool.connect()
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(describe_db_error(self._url, exc)) from None
            except PoolTimeout:
                raise DatabaseUnavailable(
                    f"all of the API's read connections stayed busy for {CHECKOUT_TIMEOUT_S} s;"
                    " try again"
                ) from None
            conn = cast(psycopg.Connection[Any], pooled.driver_connection)
            try:
                return read(conn)
            except psycopg.OperationalError as exc:
                stale = conn.broken
                if stale:
                    pooled.invalidate()
                    # Its idle connections died with the same server: a new pool takes over
                    # (as Engine.dispose does), and connections in use go back to the old one.
                    if self._pool is pool:
                        self._pool = pool.recreate()
                        pool.dispose()
                if not stale or attempt == 2:
                    raise DatabaseUnavailable(describe_db_error(self._url, exc)) from None
            except psycopg.Error as exc:  # as SQLAlchemy's: a NUL in a filter is a DataError
                raise DBAPIError.instance("", None, exc, psycopg.Error) from exc
            finally:
                pooled.close()
        raise AssertionError("unreachable")
