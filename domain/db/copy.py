"""PostgreSQL's COPY through psycopg: bulk rows into a table, each column's type taken from the
table's definition (never typed by hand), so a column change cannot leave a COPY behind."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any, Generic, TypeVar, cast

import psycopg
from psycopg.copy import LibpqWriter
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import sqltypes

T = TypeVar("T")


def copy_rows(
    conn: Connection,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    meanwhile: Callable[[], T] | None = None,
) -> T | None:
    """COPY `rows` (dicts with the same keys) into `table` inside the current transaction.

    psycopg dumps UUIDs, aware datetimes and JSON itself; money becomes an exact Decimal.

    `meanwhile` (optional) runs in this thread while PostgreSQL finishes the COPY, and its
    result is returned. The end of a COPY is slow: the server inserts its last buffered rows
    and runs every row's foreign-key checks then, time the caller would otherwise spend
    idle. A helper thread waits for the server instead (psycopg
    releases the GIL while it waits); a refusal still raises here, after `meanwhile`.
    """
    columns = [table.c[name] for name in rows[0]]
    kinds = copy_types(table, [c.name for c in columns])
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    names = ", ".join(f'"{c.name}"' for c in columns)
    statement = f"COPY {table.name} ({names}) FROM STDIN"
    writer = _FinishMeanwhile(cursor, meanwhile)
    try:
        with cursor.copy(statement, writer=writer) as copy:
            copy.set_types(kinds)  # COPY declares its types: JSON needs no wrapper
            for values in driver_values(table, rows, wrap_json=False):
                copy.write_row(values)
    except psycopg.IntegrityError as exc:
        # Same exception as the INSERT path, so callers handle one kind of constraint failure.
        raise IntegrityError(statement, None, exc) from exc
    return writer.result


def driver_values(
    table: Table, rows: list[dict[str, Any]], *, wrap_json: bool
) -> Iterator[list[Any]]:
    """Each row's values (every row has the first one's keys, in that order) as psycopg takes
    them for `table`: money as an exact Decimal, and JSON as jsonb when `wrap_json` (a
    statement's parameters; a COPY declares its column types instead)."""
    as_money, as_json = _converted(table, tuple(rows[0]), wrap_json)
    for row in rows:
        values = list(row.values())
        for i in as_money:
            if values[i] is not None:
                values[i] = Decimal(values[i])
        for i in as_json:
            if values[i] is not None:
                values[i] = Jsonb(values[i])
        yield values


_CONVERTED: dict[tuple[Table, tuple[str, ...], bool], tuple[list[int], list[int]]] = {}


def _converted(
    table: Table, names: tuple[str, ...], wrap_json: bool
) -> tuple[list[int], list[int]]:
    """Which of `names` are money and which JSON to wrap, found once per set of columns (a
    single enqueue asks for every run: thirty lookups by name each time cost more than
    converting the values)."""
    found = _CONVERTED.get((table, names, wrap_json))
    if found is None:
        affinity = [table.c[name].type._type_affinity for name in names]
        as_money = [i for i, kind in enumerate(affinity) if kind is sqltypes.Numeric]
        as_json = (
            [i for i, kind in enumerate(affinity) if kind is sqltypes.JSON] if wrap_json else []
        )
        found = _CONVERTED[(table, names, wrap_json)] = (as_money, as_json)
    return found


class _FinishMeanwhile(LibpqWriter, Generic[T]):
    """psycopg's COPY writer, except that ending a COPY that went well waits for the server
    in a helper thread while `meanwhile` runs in the caller's (psycopg releases the GIL while
    it waits). What finishing raised is raised after `meanwhile`, in the caller's thread."""

    def __init__(self, cursor: Any, meanwhile: Callable[[], T] | None) -> None:
        super().__init__(cursor)
        self.meanwhile = meanwhile
        self.result: T | None = None

    def finish(self, exc: BaseException | None = None) -> None:
        if exc is not None or self.meanwhile is None:
            super().finish(exc)
            return
        failure: list[BaseException] = []

        def end() -> None:
            try:
                LibpqWriter.finish(self, None)
            except BaseException as error:  # handed to the caller's thread below
                failure.append(error)

        finisher = threading.Thread(target=end, name="conveyor-copy-end", daemon=True)
        finisher.start()
        try:
            self.result = self.meanwhile()
        finally:
            finisher.join()
        if failure:
            raise failure[0]


#: psycopg dumper per SQLAlchemy type family (text COPY: the column's own type parses it).
_COPY_TYPES: dict[type[Any], str] = {
    sqltypes.Uuid: "uuid",
    sqltypes.String: "text",
    sqltypes.Integer: "int8",
    sqltypes.Float: "float8",
    sqltypes.Numeric: "numeric",
    sqltypes.DateTime: "timestamptz",
    sqltypes.Boolean: "bool",
    sqltypes.JSON: "jsonb",
}


def copy_types(table: Table, names: Sequence[str]) -> list[str]:
    """The PostgreSQL type of each named column of `table`, as COPY declares it (binary COPY
    needs the exact width of an integer)."""
    kinds = []
    for name in names:
        column_type = table.c[name].type
        if isinstance(column_type, sqltypes.BigInteger):
            kinds.append("int8")
        elif isinstance(column_type, sqltypes.SmallInteger):
            kinds.append("int2")
        elif isinstance(column_type, sqltypes.Integer):
            kinds.append("int4")
        else:
            kinds.append(_COPY_TYPES[column_type._type_affinity])  # type: ignore[index]
    return kinds


def copy_tuples(
    conn: Connection,
    table: Table,
    names: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    binary: bool = False,
) -> None:
    """COPY `rows` (value tuples in the order of `names`) into `table`, in the transaction
    `conn` has begun. Values go as they are: the caller passes what psycopg dumps."""
    raw = cast("psycopg.Connection[Any]", conn.connection.driver_connection)
    columns = ", ".join(f'"{name}"' for name in names)
    statement = f"COPY {table.name} ({columns}) FROM STDIN"
    if binary:
        statement += " (FORMAT BINARY)"
    with raw.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types(copy_types(table, names))
        for row in rows:
            copy.write_row(row)
