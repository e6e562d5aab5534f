"""Signals: a JSON payload sent to a run by name, which `ctx.wait_for(name)` receives.

A signal is kept until a wait of its name consumes it, oldest first, so one sent before the
run reaches its wait is not lost; one whose `key` was already sent to the run is the same
signal, accepted once. Sending to a run that waits for that name makes it due at once (the
relay delivers it); sending to a run that has ended is a Conflict.

The wake-up cannot be missed: sending locks the run's row, and an execution that suspends to
wait looks for a signal in a statement of its own after it has written the run waiting (so
after any send that held the row), making itself due if one came (`wake_if_sent`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, update

from domain import storable
from domain.db import sql
from domain.db.models import run_signals, runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, InvalidInput, RunNotFound
from domain.runs.requests import NAME_PATTERN
from domain.runs.states import TERMINAL, Status
from domain.security import audit

#: The wait_reason of a run waiting for the signal `name`.
PREFIX = "signal:"
#: The wake time of a wait with no timeout: only a signal makes the run due.
NEVER = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class SignalView:
    id: int
    run_id: uuid.UUID
    name: str
    key: str | None
    sent_at: datetime
    #: False: a signal with this key had been sent to the run already (nothing new was kept).
    new: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run_id": str(self.run_id),
            "name": self.name,
            "key": self.key,
            "sent_at": self.sent_at.isoformat(),
            "new": self.new,
        }


#: The most a payload may take as JSON, as for a run's params.
MAX_PAYLOAD_BYTES = 1 << 20


def _check_payload(payload: Any) -> None:
    try:
        size = len(json.dumps(payload, allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"payload: not JSON ({exc})", field="payload") from None
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidInput(
            f"payload: {size} bytes as JSON, more than {MAX_PAYLOAD_BYTES}", field="payload"
        )
    storable.check_fields({"payload": payload})


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name) or len(name) > 200:
        raise InvalidInput(
            f"signal name: {name!r}: use letters, digits, _ . : - (at most 200)", field="name"
        )
    return name


def send(
    uow: UnitOfWork,
    run_id: uuid.UUID,
    name: str,
    payload: Any = None,
    *,
    key: str | None = None,
    actor: str,
    ip: str | None = None,
) -> SignalView:
    """Keep a signal for the run (audited as run.signal in the same transaction) and, if the
    run waits for this name, make it due now."""
    check_name(name)
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 255):
        raise InvalidInput("key: text of 1 to 255 characters", field="key")
    _check_payload(payload)
    with uow:
        conn = uow.conn
        now = uow.clock()
        run = conn.execute(
            sql.for_update(
                conn, select(runs.c.status, runs.c.wait_reason).where(runs.c.id == run_id)
            )
        ).first()
        if run is None:
            raise RunNotFound(f"no run with id {run_id}", run_id=str(run_id))
        if run.status in TERMINAL:
            raise Conflict(
                f"run {run_id} already ended as {run.status}; nothing waits for signal {name!r}",
                status=run.status,
            )
        if key is not None:
            earlier = conn.execute(
                select(run_signals.c.id, run_signals.c.sent_at).where(
                    run_signals.c.run_id == run_id,
                    run_signals.c.name == name,
                    run_signals.c.key == key,
                )
            ).first()
            if earlier is not None:
                return SignalView(earlier.id, run_id, name, key, earlier.sent_at, new=False)
        signal_id = conn.execute(
            run_signals.insert()
            .values(run_id=run_id, name=name, key=key, payload=payload, sent_at=now)
            .returning(run_signals.c.id)
        ).scalar_one()
        if run.status == Status.WAITING and run.wait_reason == PREFIX + name:
            _make_due(conn, run_id, now)
        audit.record(
            uow,
            actor=actor,
            action="run.signal",
            target_type="run",
            target_id=str(run_id),
            details={"name": name, "key": key},
            ip=ip,
        )
        uow.commit()
    return SignalView(int(signal_id), run_id, name, key, now, new=True)


def take(conn: Connection, run_id: uuid.UUID, name: str, *, now: datetime) -> Any | None:
    """Consume the oldest signal of `name` the run has: its payload wrapped in a one-item
    list (a payload may itself be None), or None when there is none."""
    row = conn.execute(
        sql.for_update(
            conn,
            select(run_signals.c.id, run_signals.c.payload)
            .where(
                run_signals.c.run_id == run_id,
                run_signals.c.name == name,
                run_signals.c.consumed_at.is_(None),
            )
            .order_by(run_signals.c.id)
            .limit(1),
        )
    ).first()
    if row is None:
        return None
    conn.execute(update(run_signals).where(run_signals.c.id == row.id).values(consumed_at=now))
    return [row.payload]


def wake_if_sent(conn: Connection, run_id: uuid.UUID, reason: str, *, now: datetime) -> None:
    """After writing the run waiting for a signal (in the same transaction, a statement of its
    own): if that signal came meanwhile, the run is due now."""
    if not reason.startswith(PREFIX):
        return
    sent = conn.execute(
        select(run_signals.c.id)
        .where(
            run_signals.c.run_id == run_id,
            run_signals.c.name == reason.removeprefix(PREFIX),
            run_signals.c.consumed_at.is_(None),
        )
        .limit(1)
    ).first()
    if sent is not None:
        _make_due(conn, run_id, now)


def _make_due(conn: Connection, run_id: uuid.UUID, now: datetime) -> None:
    conn.execute(
        update(runs)
        .where(runs.c.id == run_id, runs.c.status == Status.WAITING)
        .values(not_before=now, dispatched_at=None)
    )
