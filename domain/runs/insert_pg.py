"""Inserting a batch of runs that carry idempotency keys, on PostgreSQL through psycopg: one
single-row INSERT prepared once per connection, executed for every row in one pipeline."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from domain.db.copy import driver_values
from domain.db.models import runs

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
