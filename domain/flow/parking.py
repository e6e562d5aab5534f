"""A run that may not start yet, made to wait at its claim without holding a worker."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, update

from domain.db.models import runs
from domain.runs.states import Status


@dataclass(frozen=True, slots=True)
class Wait:
    """A gate's answer for a run that may not start: it now waits, until `wake_at` at most."""

    reason: str
    wake_at: datetime
    detail: str


def park(
    conn: Connection,
    run_id: uuid.UUID,
    claimable: Any,
    *,
    opened: bool,
    reason: str,
    wake_at: datetime,
) -> None:
    """Write the claimable run `waiting` for `reason` until `wake_at` (the relay delivers it
    then). `opened`: it already waits in an attempt; otherwise its attempt opens here, waiting,
    and the claim that starts it goes on with it."""
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
    conn.execute(update(runs).where(runs.c.id == run_id, claimable).values(**values))
