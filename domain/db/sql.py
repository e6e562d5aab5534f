"""Statements whose SQL differs between PostgreSQL and SQLite, built in one place.

Each builder takes the connection it will run on and returns what that database understands;
the meaning is the same on both (see domain/db/capabilities.py for what differs and why).
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Connection,
    Integer,
    Select,
    Table,
    any_,
    bindparam,
    cast,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from domain.db.capabilities import capabilities

S = TypeVar("S", bound=Select[Any])


def insert(conn: Connection, table: Table) -> Any:
    """An INSERT into `table` that supports ON CONFLICT (`on_conflict_do_nothing/_do_update`)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def for_update(conn: Connection, query: S, **how: Any) -> S:
    """`query` locking the rows it reads (`how`: skip_locked, key_share, read) where rows can be
    locked; on SQLite, whose single writer serialises transactions, the query as it is."""
    return query.with_for_update(**how) if capabilities(conn).row_locks else query


def any_of(conn: Connection, column: Any, ids: list[int]) -> Any:
    """`column IN ids`; as `= ANY(array)` where arrays are parameters, one however many ids."""
    if capabilities(conn).arrays:
        return column == any_(bindparam("ids", ids, type_=ARRAY(BigInteger)))
    return column.in_(ids)


def seconds_between(conn: Connection, start: Any, end: Any) -> Any:
    """The seconds from `start` to `end` (two timestamp columns) as a number."""
    if capabilities(conn).server_stats:
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def greatest(conn: Connection, *values: Any) -> Any:
    """The largest of `values` (SQLite's two-argument max is its GREATEST)."""
    return func.max(*values) if conn.dialect.name == "sqlite" else func.greatest(*values)


def epoch_minute(conn: Connection, column: Any) -> Any:
    """The whole minutes from the Unix epoch to `column` (a UTC timestamp), as an integer: a
    bucket key that groups rows by the minute they fall in."""
    if capabilities(conn).server_stats:
        return cast(func.floor(func.extract("epoch", column) / 60), BigInteger)
    # SQLite keeps naive UTC text; strftime('%s') reads it as UTC, in whole seconds.
    return cast(func.strftime("%s", column), Integer) // 60


def lock_key(conn: Connection, key: str) -> None:
    """Hold a lock named `key` until the transaction ends (a transaction-scoped advisory lock
    on PostgreSQL); on SQLite every write transaction already holds the one writer lock."""
    if capabilities(conn).advisory_locks:
        conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(key, 0))))
