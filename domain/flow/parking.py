"""A run that may not start yet, made to wait at its claim without holding a worker."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, update

from domain.db.models import runs
from domain.ports import Dispatch
from domain.runs.states import Status


@dataclass(frozen=True, slots=True)
class Wait:
    """A gate's answer for a run that may not start: it now waits, until `wake_at` at most."""

    reason: str
    wake_at: datetime
    detail: str
    #: The run's queue, when it had waited for its project's turn there (domain/flow/fair.py):
    #: parked, it no longer holds that queue's place.
    turn_queue: str | None = None
    #: Runs the gate made due (older waiters it yielded to), for the worker to publish at once
    #: rather than leave to the relay's next sweep.
    woken: tuple[Dispatch, ...] = ()


def park(
    conn: Connection,
    run_id: uuid.UUID,
    claimable: Any,
    *,
    opened: bool,
    reason: str,
    wake_at: datetime,
) -> str | None:
    """Write the claimable run `waiting` for `reason` until `wake_at` (the relay delivers it
    then). `opened`: it already waits in an attempt; otherwise its attempt opens here, waiting,
    and the claim that starts it goes on with it. Returns the run's queue if it had waited
    for its project's turn there (its place in the queue is free now), else None."""
    values: dict[str, Any] = {
        "status": Status.WAITING,
        "wait_reason": reason,
        "not_before": wake_at,
        "dispatched_at": None,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if not opened:
        values["attempt"] = runs.c.attempt + 1
    row = conn.execute(
        update(runs)
        .where(runs.c.id == run_id, claimable)
        .values(**values)
        .returning(runs.c.paced, runs.c.queue)
    ).first()
    return row.queue if row is not None and row.paced else None
