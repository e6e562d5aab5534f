"""Creating runs: one or a batch, on behalf of an actor with its audit row. A run's row (its
delivery intent) commits before its message is published (guarantee 1)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from domain.clock import uuid7_many
from domain.costs import ledger as costs
from domain.db.engine import describe_db_error
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, DatabaseUnavailable, InvalidInput
from domain.flow import fair, rates
from domain.ports import (
    Catalog,
    Dispatch,
    OpenCatalog,
    Publisher,
    in_flight_limit,
    send_later,
)
from domain.runs.recovery import publish_turns, send_or_hand_back, send_unconfirmed_or_hand_back
from domain.runs.requests import EnqueueRequest
from domain.runs.rows import run_row
from domain.runs.views import RunView
from domain.security import audit
from domain.storage import run_intake

log = structlog.get_logger("conveyor.runs")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Enqueued:
    run: RunView
    created: bool  # False: the idempotency key named an existing run


#: Writes rows that belong with a batch of runs, in their transaction, given what was enqueued.
Recorder = Callable[[Connection, list[Enqueued]], None]


def _same_request(existing: RunView, row: dict[str, Any]) -> bool:
    return bool(existing.name == row["name"] and existing.params == row["params"])


def _key_reused(key: str, existing: RunView) -> Conflict:
    return Conflict(
        f"idempotency_key: {key!r} was already used for a different request "
        f"(run {existing.id}, task {existing.name!r}); use a new key for new work",
        run_id=str(existing.id),
    )


def enqueue(
    uow: UnitOfWork,
    req: EnqueueRequest,
    *,
    publisher: Publisher | None = None,
    catalog: Catalog | None = None,
    inline: bool = False,
    after: uuid.UUID | None = None,
) -> Enqueued:
    """Record one run (and so its delivery intent) and publish it after commit.

    With an idempotency key that already names a run of the same task and params, that run is
    returned (created=False); the same key for a different request is a Conflict.
    """
    return enqueue_many(
        uow, [req], publisher=publisher, catalog=catalog, inline=inline, after=after
    )[0]


def create_run(
    uow: UnitOfWork,
    req: EnqueueRequest,
    *,
    actor: str,
    ip: str | None = None,
    action: str = "run.create",
    publisher: Publisher | None = None,
    catalog: Catalog | None = None,
) -> Enqueued:
    """`enqueue` on behalf of `actor`: a run it creates is audited (`action`, with its name,
    params and idempotency key) in the run's own transaction, so no run exists unaudited and
    no audit row names a run that was never made. A run an idempotency key found is not."""

    def audit_created(conn: Connection, results: list[Enqueued]) -> None:
        for made in results:
            if made.created:
                details = {
                    "name": made.run.name,
                    "params": made.run.params,
                    "idempotency_key": req.idempotency_key,
                }
                if made.run.kind == "pipeline":
                    details["pipeline"] = made.run.name
                audit.add(
                    conn,
                    actor=actor,
                    action=action,
                    target_type="run",
                    target_id=str(made.run.id),
                    details=details,
                    ip=ip,
                    ts=uow.clock(),
                )

    return enqueue_many(uow, [req], publisher=publisher, catalog=catalog, record=audit_created)[0]


def enqueue_many(
    uow: UnitOfWork,
    reqs: Sequence[EnqueueRequest],
    *,
    publisher: Publisher | None = None,
    catalog: Catalog | None = None,
    inline: bool = False,
    after: uuid.UUID | None = None,
    record: Recorder | None = None,
) -> list[Enqueued]:
    """Record a batch of runs in one transaction and publish them in one broker call.

    Without a publisher the relay delivers them; `inline` means the caller executes them
    itself right away (conveyor.submit), so nothing is published. `record` writes what belongs
    with the runs (webhook deliveries), in their transaction, given what was enqueued.
    """
    if not reqs:
        return []
    catalog = catalog or OpenCatalog()
    now = uow.clock()
    publish_now = publisher is not None or inline
    ids = uuid7_many(len(reqs))
    rows = [
        run_row(req, catalog, now, publish_now, run_id)
        for req, run_id in zip(reqs, ids, strict=True)
    ]
    if after is not None:
        from domain.runs.chains import hold_after

        rows = [hold_after(row, after) for row in rows]
    in_flight = 0 if publisher is None or inline else in_flight_limit(publisher)
    if after is None and record is None and len(rows) == 1 and rows[0]["rate_limit"] is None:
        quick = _enqueue_one(uow, rows[0], publisher, in_flight, now)
        if quick is not None:
            return [quick]
    with uow:
        costs.check_can_enqueue(uow.conn, {row["project"] for row in rows}, now)
        rates.check_known(uow.conn, {row["rate_limit"] for row in rows})
        with_room = fair.pace(uow.conn, rows, limit=in_flight) if in_flight else set()
        if after is not None:
            uow.runs.get(after)  # RunNotFound: a run cannot wait for one that does not exist
        try:
            results, send = _insert(
                uow, rows, lambda made: _prepare_publish(uow.engine, publisher, made, now)
            )
        except IntegrityError:
            uow.rollback()
            _explain_integrity_error(uow, rows)
            raise
        if record is not None:
            record(uow.conn, results)
        if send is not None:
            uow.after_commit(send)
        if with_room:
            assert publisher is not None
            turns = sorted(with_room)
            uow.after_commit(
                lambda: _take_turns(uow.engine, publisher, in_flight, uow.clock(), turns)
            )
        uow.commit()
    created = [r.run for r in results if r.created]
    if len(created) == 1:
        log.debug("run.enqueued", run_id=str(created[0].id), name=created[0].name)
    elif created:
        log.debug("runs.enqueued", count=len(created))
    return results


def _enqueue_one(
    uow: UnitOfWork, row: dict[str, Any], publisher: Publisher | None, in_flight: int, now: datetime
) -> Enqueued | None:
    """The plain single enqueue in one round trip where the database offers it (PostgreSQL:
    domain/runs/insert_pg.py `PgIntake`): the same checks and pacing as `enqueue_many`'s
    transaction, in one statement. None: the general path answers (a project at its limit,
    an idempotency key in use, a missing project: each explained there)."""
    intake = run_intake(uow.engine)
    if intake is None:
        return None
    try:
        inserted = intake.insert_one(row, month=costs.month_of(now), in_flight=in_flight)
    except IntegrityError:
        return None
    except OperationalError as exc:
        raise DatabaseUnavailable(describe_db_error(str(uow.engine.url), exc)) from None
    if not inserted.made:
        return None
    made = Enqueued(_view(row), True)
    if publisher is not None and row["dispatched_at"] is not None:
        # The caller waits for PostgreSQL only: the broker's reply is read at the next publish.
        dispatch = Dispatch(row["id"], row["name"], row["queue"], row["priority"], row["params"])
        send_unconfirmed_or_hand_back(publisher, uow.engine, [dispatch], marked_at=now)
    if inserted.turns:
        assert publisher is not None
        _take_turns(uow.engine, publisher, in_flight, now, [row["queue"]])
    log.debug("run.enqueued", run_id=str(row["id"]), name=row["name"])
    return made


def _take_turns(
    engine: Engine, publisher: Publisher, in_flight: int, now: datetime, queues: list[str]
) -> None:
    """After an enqueue that paced runs in `queues` while a quarter of their places were free:
    their turns, given only if a quarter still is (`fair.top_up_at`, as the claims do)."""
    publish_turns(
        engine,
        publisher,
        limit=in_flight,
        now=now,
        queues=queues,
        at_least=fair.top_up_at(in_flight),
    )


def _prepare_publish(
    engine: Engine, publisher: Publisher | None, results: list[Enqueued], now: datetime
) -> Callable[[], None] | None:
    """What to run after commit to publish the runs created due now (messages built now)."""
    if publisher is None:
        return None
    dispatches = [
        Dispatch(r.run.id, r.run.name, r.run.queue, r.run.priority, r.run.params)
        for r in results
        if r.created and r.run.dispatched_at is not None
    ]
    if not dispatches:
        return None
    send = send_later(publisher, dispatches)
    return lambda: send_or_hand_back(send, engine, [d.run_id for d in dispatches], marked_at=now)


def _insert(
    uow: UnitOfWork, rows: list[dict[str, Any]], then: Callable[[list[Enqueued]], T]
) -> tuple[list[Enqueued], T]:
    """Insert the rows; return what was enqueued and what `then` made of it. (On the COPY path
    `then` runs while the database ends the insert.)"""

    def done(results: list[Enqueued]) -> tuple[list[Enqueued], T]:
        return results, then(results)

    if len(rows) == 1:
        row = rows[0]
        if uow.runs.insert_one(row):
            return done([Enqueued(_view(row), True)])
        existing = uow.runs.by_keys(row["project"], [row["idempotency_key"]])
        return done([_resolve_duplicate(row, existing)])

    # A batch: duplicates inside it collapse onto their first occurrence, then one executemany.
    first_by_key: dict[tuple[str, str], dict[str, Any]] = {}
    to_insert = []
    for row in rows:
        key = row["idempotency_key"]
        if key is not None:
            ident = (row["project"], key)
            if ident in first_by_key:
                continue
            first_by_key[ident] = row
        to_insert.append(row)
    if not first_by_key:
        # No keys, so nothing to look up afterwards: the views (and `then`: the messages) are
        # built while the database ends the insert (RunRepository.insert_many's `meanwhile`).
        made = uow.runs.insert_many(
            to_insert, meanwhile=lambda: done([Enqueued(_view(row), True) for row in rows])
        )
        assert made is not None
        return made
    inserted = uow.runs.insert_keyed(to_insert)
    # Only keys that named a run already are read back; an inserted run's view is its row.
    keyed: dict[str, list[str]] = {}
    stored_by_key: dict[tuple[str, str], RunView] = {}
    for ident, first in first_by_key.items():
        if first["id"] in inserted:
            stored_by_key[ident] = _view(first)
        else:
            keyed.setdefault(ident[0], []).append(ident[1])
    for project, keys in keyed.items():
        for key, view in uow.runs.by_keys(project, keys).items():
            stored_by_key[(project, key)] = view
    results = []
    for row in rows:
        key = row["idempotency_key"]
        if key is None:
            results.append(Enqueued(_view(row), True))
            continue
        stored = stored_by_key[(row["project"], key)]
        if stored.id == row["id"]:
            results.append(Enqueued(stored, True))
        else:
            results.append(_resolve_duplicate(row, {key: stored}))
    return done(results)


def _resolve_duplicate(row: dict[str, Any], existing: dict[str, RunView]) -> Enqueued:
    view = existing[row["idempotency_key"]]
    if not _same_request(view, row):
        raise _key_reused(row["idempotency_key"], view)
    return Enqueued(view, False)


def _view(row: dict[str, Any]) -> RunView:
    values: dict[str, Any] = {
        "lease_owner": None,
        "lease_expires_at": None,
        "cancel_requested_at": None,
        "result": None,
        "error_type": None,
        "error": None,
        "exit_code": None,
        "started_at": None,
        "finished_at": None,
    }
    values.update(row)
    return RunView(**values)


def _explain_integrity_error(uow: UnitOfWork, rows: list[dict[str, Any]]) -> None:
    """Turn a constraint failure into the caller's mistake, named (most often: no such project)."""
    for project in sorted({row["project"] for row in rows}):
        if not uow.runs.project_exists(project):
            raise InvalidInput(
                f"project: no project named {project!r} (create it first)", field="project"
            )
