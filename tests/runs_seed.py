"""Runs and workers written straight into the tables, at chosen times and states, for the
reads that summarise them (the dashboard's overview)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert

from domain.db.models import runs, workers


def insert_run(engine: Engine, name: str = "report", **values: Any) -> uuid.UUID:
    """One run; `values` are its columns (created_at defaults to now, the rest to the table's
    defaults). A terminal status without finished_at gets one at created_at."""
    run_id = uuid.uuid4()
    created = values.setdefault("created_at", datetime.now(UTC))
    values.setdefault("not_before", created)
    status = values.get("status", "pending")
    if status not in {"pending", "running", "waiting"}:
        values.setdefault("started_at", created)
        values.setdefault("finished_at", created)
    with engine.begin() as conn:
        conn.execute(insert(runs).values(id=run_id, name=name, **values))
    return run_id


def insert_worker(engine: Engine, worker_id: str, *, silent_s: float, **values: Any) -> None:
    """A worker whose last heartbeat was `silent_s` seconds ago."""
    beat = datetime.now(UTC) - timedelta(seconds=silent_s)
    values.setdefault("started_at", beat - timedelta(minutes=5))
    with engine.begin() as conn:
        conn.execute(
            insert(workers).values(
                id=worker_id, hostname=f"host-{worker_id}", pid=1234, heartbeat_at=beat, **values
            )
        )
