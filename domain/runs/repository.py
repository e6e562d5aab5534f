"""Run persistence in SQLAlchemy Core: short statements over the unit of work's connection."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, and_, func, or_, select, update

from domain.db import sql
from domain.db.capabilities import Capabilities, capabilities
from domain.db.copy import copy_rows
from domain.db.models import cost_entries, projects, run_logs, run_steps, runs
from domain.errors import InvalidInput, RunNotFound
from domain.runs import insert_pg
from domain.runs.states import ALL_STATUSES, TERMINAL, Status
from domain.runs.views import LogLine, Page, RunView, StepView

#: Runs as RunView's fields, in its field order, newest first (keyset on created_at, id).
_PAGE = select(*[runs.c[name] for name in RunView.field_names()]).order_by(
    runs.c.created_at.desc(), runs.c.id.desc()
)

MAX_PAGE = 1000
T = TypeVar("T")


#: ON CONFLICT target of a run's idempotency key: the partial unique index on (project, key)
#: is only inferred when the statement names its predicate too.
ON_KEY_CONFLICT: dict[str, Any] = {
    "index_elements": ["project", "idempotency_key"],
    "index_where": runs.c.idempotency_key.is_not(None),
}


#: A log line as LogLine holds it.
LOG_LINE_COLUMNS = (
    run_logs.c.seq,
    run_logs.c.attempt,
    run_logs.c.ts,
    run_logs.c.stream,
    run_logs.c.level,
    run_logs.c.message,
    run_logs.c.fields,
)


@dataclass(frozen=True)
class RunFilter:
    """Filters for listing runs; every field is optional."""

    status: Sequence[str] = ()
    name: str | None = None
    project: str | None = None
    queue: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    #: Text the run's error contains (any case).
    error: str | None = None
    #: Only these runs (a selection made on a page).
    ids: Sequence[uuid.UUID] = ()

    def __post_init__(self) -> None:
        unknown = [s for s in self.status if s not in ALL_STATUSES]
        if unknown:
            raise InvalidInput(
                f"status: unknown status {unknown[0]!r}; expected one of {', '.join(ALL_STATUSES)}",
                field="status",
            )


def like_pattern(text: str) -> str:
    """A LIKE pattern for runs whose column contains `text` literally (escape character \\)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def matching(filters: RunFilter) -> list[ColumnElement[bool]]:
    """The WHERE conditions of `filters`, for a page of runs or a bulk action on them."""
    conditions: list[ColumnElement[bool]] = []
    if filters.status:
        conditions.append(runs.c.status.in_(list(filters.status)))
    if filters.name:
        conditions.append(runs.c.name == filters.name)
    if filters.project:
        conditions.append(runs.c.project == filters.project)
    if filters.queue:
        conditions.append(runs.c.queue == filters.queue)
    if filters.created_after:
        conditions.append(runs.c.created_at >= filters.created_after)
    if filters.created_before:
        conditions.append(runs.c.created_at < filters.created_before)
    if filters.error:
        conditions.append(runs.c.error.ilike(like_pattern(filters.error), escape="\\"))
    if filters.ids:
        conditions.append(runs.c.id.in_(list(filters.ids)))
    return conditions


def check_page_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit: must be between 1 and {MAX_PAGE} (got {limit})", field="limit")


def page_of(rows: list[RunView], limit: int) -> Page:
    """A page from up to `limit + 1` runs, newest first: the extra one says a next page exists."""
    if len(rows) <= limit:
        return Page(items=rows, next_cursor=None)
    items = rows[:limit]
    return Page(items=items, next_cursor=encode_cursor(items[-1].created_at, items[-1].id))


def encode_cursor(created_at: datetime, run_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{run_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Inverse of encode_cursor; anything else is an InvalidInput, never a 500."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, run_id = raw.split("|")
        created = datetime.fromisoformat(ts)
        if created.tzinfo is None:
            raise ValueError("naive")
        return created, uuid.UUID(run_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(
            "cursor: not a cursor this server issued (pass next_cursor back unchanged)",
            field="cursor",
        ) from None


_INSERT_RETURNING_ID: dict[Capabilities, Any] = {}


class RunRepository:
    """Reads and writes `runs` and the rows that hang off it, within one transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # -- writes -----------------------------------------------------------------------------
    def _insert_returning_id(self) -> Any:
        """INSERT of a run, skipped when its idempotency key names a run already, RETURNING id.
        Built once per kind of database, not per call: building an INSERT of every column, and its
        cache key, cost more CPU than the round trip. A NULL key never conflicts."""
        stmt = _INSERT_RETURNING_ID.get(capabilities(self.conn))
        if stmt is None:
            stmt = _INSERT_RETURNING_ID[capabilities(self.conn)] = (
                sql.insert(self.conn, runs)
                .on_conflict_do_nothing(**ON_KEY_CONFLICT)
                .returning(runs.c.id)
            )
        return stmt

    def insert_one(self, row: dict[str, Any]) -> bool:
        """Insert a run; False when its idempotency key already names another run."""
        return self.conn.execute(self._insert_returning_id(), row).first() is not None

    def insert_many(
        self, rows: list[dict[str, Any]], *, meanwhile: Callable[[], T] | None = None
    ) -> T | None:
        """Insert a batch; rows whose idempotency key already exists are skipped.

        On PostgreSQL a batch without keys goes through COPY (several times faster than
        pipelined INSERTs), and `meanwhile` runs while the server finishes it (see copy_rows); keys
        need ON CONFLICT, which COPY cannot do. Returns what `meanwhile` returned.
        """
        if (
            rows
            and capabilities(self.conn).copy
            and all(row["idempotency_key"] is None for row in rows)
        ):
            return copy_rows(self.conn, runs, rows, meanwhile=meanwhile)
        if rows:
            stmt = sql.insert(self.conn, runs).on_conflict_do_nothing(**ON_KEY_CONFLICT)
            self.conn.execute(stmt, rows)
        return meanwhile() if meanwhile is not None else None

    def insert_keyed(self, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
        """Insert a batch with idempotency keys; the ids of the rows inserted (a row whose key
        already names a run is skipped), so only the skipped rows need reading back."""
        if not rows:
            return set()
        if capabilities(self.conn).copy:  # psycopg: one prepared INSERT, pipelined
            return insert_pg.insert_keyed(self.conn, rows)
        return set(self.conn.execute(self._insert_returning_id(), rows).scalars())

    def set_cancelled(self, run_id: uuid.UUID, now: datetime, reason: str) -> bool:
        """Pending or waiting → cancelled at once. False when the run was neither."""
        result = self.conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.status.in_((Status.PENDING, Status.WAITING)))
            .values(
                status=Status.CANCELLED,
                cancel_requested_at=now,
                finished_at=now,
                error_type="Cancelled",
                error=reason,
            )
        )
        return result.rowcount == 1

    def request_cancel(self, run_id: uuid.UUID, now: datetime) -> bool:
        """Running: ask the executor to stop. False when the run was no longer running."""
        result = self.conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.status == Status.RUNNING)
            .values(cancel_requested_at=func.coalesce(runs.c.cancel_requested_at, now))
        )
        return result.rowcount == 1

    # -- reads ------------------------------------------------------------------------------
    def get(self, run_id: uuid.UUID) -> RunView:
        row = self.conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
        if row is None:
            raise RunNotFound(f"no run with id {run_id}", run_id=str(run_id))
        return RunView.from_row(row)

    def by_keys(self, project: str, keys: Iterable[str]) -> dict[str, RunView]:
        wanted = list(set(keys))
        found: dict[str, RunView] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = self.conn.execute(
                select(runs).where(runs.c.project == project, runs.c.idempotency_key.in_(chunk))
            ).mappings()
            for row in rows:
                view = RunView.from_row(row)
                found[view.idempotency_key or ""] = view
        return found

    def project_exists(self, name: str) -> bool:
        found = self.conn.execute(select(projects.c.name).where(projects.c.name == name)).first()
        return found is not None

    def page(self, filters: RunFilter, *, limit: int = 50, cursor: str | None = None) -> Page:
        """Newest first, keyset-paginated on (created_at, id)."""
        check_page_limit(limit)
        conditions = matching(filters)
        if cursor:
            created, last_id = decode_cursor(cursor)
            conditions.append(
                or_(
                    runs.c.created_at < created,
                    and_(runs.c.created_at == created, runs.c.id < last_id),
                )
            )
        stmt = _PAGE.where(*conditions).limit(limit + 1)
        # Positional rows from a statement built once: a page is the API's busiest read, and
        # a mapping per row of 36 columns, plus coercing 36 columns into a new SELECT on every
        # call, were a sixth of its CPU.
        return page_of([RunView(*row) for row in self.conn.execute(stmt).all()], limit)

    def logs(self, run_id: uuid.UUID, *, after_seq: int = 0, limit: int = 1000) -> list[LogLine]:
        stmt = (
            select(*LOG_LINE_COLUMNS)
            .where(run_logs.c.run_id == run_id, run_logs.c.seq > after_seq)
            .order_by(run_logs.c.seq)
            .limit(limit)
        )
        return [LogLine(**row) for row in self.conn.execute(stmt).mappings()]

    def steps(self, run_id: uuid.UUID) -> list[StepView]:
        stmt = (
            select(
                run_steps.c.seq,
                run_steps.c.attempt,
                run_steps.c.name,
                run_steps.c.step_type,
                run_steps.c.status,
                run_steps.c.detail,
                run_steps.c.started_at,
                run_steps.c.finished_at,
                run_steps.c.occurrence,
                run_steps.c.tries,
            )
            .where(run_steps.c.run_id == run_id)
            .order_by(run_steps.c.seq)
        )
        rows = self.conn.execute(stmt).mappings().all()
        if not rows:
            return []
        # Summed here, exactly: SQLite keeps money as text and would sum it as floats.
        spent: dict[int, Decimal] = {}
        for step_seq, usd in self.conn.execute(
            select(cost_entries.c.step_seq, cost_entries.c.cost_usd).where(
                cost_entries.c.run_id == run_id, cost_entries.c.step_seq.is_not(None)
            )
        ):
            spent[step_seq] = spent.get(step_seq, Decimal(0)) + Decimal(usd)
        return [StepView(**row, cost_usd=spent.get(row["seq"], Decimal(0))) for row in rows]


def is_finished(view: RunView) -> bool:
    return view.status in TERMINAL
