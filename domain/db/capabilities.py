"""What the database behind a connection can do, decided once per kind of database.

Code elsewhere asks a capability (`capabilities(conn).row_locks`), never a database's name:
conveyor runs on PostgreSQL in production and on SQLite in dev mode, and what differs between
them is listed here, once, with what each difference means.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

from sqlalchemy import Connection, Engine


@dataclass(frozen=True, slots=True)
class Capabilities:
    #: SELECT ... FOR UPDATE (with SKIP LOCKED, KEY SHARE). SQLite has one writer at a time,
    #: which serialises what the locks would.
    row_locks: bool
    #: Many writers at once, so a transaction may stay open while others write (SQLite: a
    #: transaction held open stalls every other writer).
    concurrent_writers: bool
    #: LISTEN/NOTIFY: a commit can wake another process (the scheduler); else it polls.
    notify: bool
    #: Session-level advisory locks: the scheduler's leader lock across hosts; else a file lock.
    advisory_locks: bool
    #: Money columns are NUMERIC and add up in SQL; else they are exact text, added in Python.
    numeric_money: bool
    #: COPY FROM STDIN through the driver (psycopg), for bulk inserts.
    copy: bool
    #: Array parameters (`= ANY(:ids)`, `unnest`): one parameter however many values.
    arrays: bool
    #: A server-side timeout for a transaction left idle (a frozen process's locks end).
    idle_timeouts: bool
    #: READ COMMITTED can be asked for per connection (a snapshot per statement).
    read_committed: bool
    #: date_trunc and percentile aggregates: statistics computed by the server.
    server_stats: bool
    #: conveyor's own SQL functions (migration 0016's conveyor_rate_take): a rate limit's take
    #: in one round trip; else the same steps one statement at a time.
    stored_functions: bool
    #: run_logs and run_metrics are partitioned by day of run id (migration 0019): retention
    #: drops a day's partitions once all its runs may go; else it deletes lines by run.
    partitioned_history: bool
    #: The keys to runs are triggers (migration 0022): a delete removes its runs' records in
    #: one statement per table, not one per run; TRUNCATE runs must name the tables that refer
    #: to it (CASCADE does not reach them); autogenerate expects those keys not to be there.
    run_key_triggers: bool


POSTGRESQL = Capabilities(
    row_locks=True,
    concurrent_writers=True,
    notify=True,
    advisory_locks=True,
    numeric_money=True,
    copy=True,
    arrays=True,
    idle_timeouts=True,
    read_committed=True,
    server_stats=True,
    stored_functions=True,
    partitioned_history=True,
    run_key_triggers=True,
)
SQLITE = Capabilities(
    row_locks=False,
    concurrent_writers=False,
    notify=False,
    advisory_locks=False,
    numeric_money=False,
    copy=False,
    arrays=False,
    idle_timeouts=False,
    read_committed=False,
    server_stats=False,
    stored_functions=False,
    partitioned_history=False,
    run_key_triggers=False,
)


def capabilities(bind: Connection | Engine) -> Capabilities:
    """The capabilities of the database `bind` talks to."""
    return _of(bind.dialect.name, bind.dialect.driver)


@cache
def _of(name: str, driver: str) -> Capabilities:
    if name == "sqlite":
        return SQLITE
    if name == "postgresql":
        # COPY goes through psycopg's own API; another driver gets the portable statements.
        return POSTGRESQL if driver == "psycopg" else replace(POSTGRESQL, copy=False)
    raise NotImplementedError(f"conveyor supports PostgreSQL and SQLite, not {name}")
