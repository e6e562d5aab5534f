"""Checkpointed steps: once a step completed, its row holds its result, and every later attempt
of the run returns that result instead of calling the step again.

A checkpointed step is identified by its name and occurrence (the n-th step of that name the
run reached), so a loop of steps works. The run's history is its completed checkpointed steps
in the order it reached them; an attempt must reach them in that order (worker/steps.py checks
it). Completing a step is fenced by attempt, like every write of a running run: an attempt
that lost its lease cannot record a result over the attempt that replaced it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, exists, select, update

from domain.db.models import run_steps, runs
from domain.runs.states import Status


@dataclass(frozen=True, slots=True)
class Done:
    """A completed checkpointed step: what a later attempt returns without running it."""

    seq: int
    name: str
    occurrence: int
    result: Any


@dataclass(frozen=True, slots=True)
class History:
    #: Completed checkpointed steps, in the order the run reached them.
    done: list[Done] = field(default_factory=list)
    #: (name, occurrence) -> seq of a checkpointed step that started but never completed
    #: (its attempt was interrupted, or it failed): run again, it keeps its row.
    unfinished: dict[tuple[str, int], int] = field(default_factory=dict)
    #: Names of every checkpointed step the run has a row for (not planned again).
    names: frozenset[str] = frozenset()


def history(conn: Connection, run_id: uuid.UUID) -> History:
    """The run's checkpointed steps as its earlier attempts left them (one query)."""
    rows = conn.execute(
        select(
            run_steps.c.seq,
            run_steps.c.name,
            run_steps.c.occurrence,
            run_steps.c.status,
            run_steps.c.result,
        )
        .where(run_steps.c.run_id == run_id, run_steps.c.occurrence.is_not(None))
        .order_by(run_steps.c.seq)
    ).all()
    done = [Done(r.seq, r.name, r.occurrence, r.result) for r in rows if r.status == "completed"]
    unfinished = {(r.name, r.occurrence): r.seq for r in rows if r.status != "completed"}
    return History(done, unfinished, frozenset(r.name for r in rows))


def start(
    conn: Connection,
    run_id: uuid.UUID,
    attempt: int,
    *,
    seq: int,
    name: str,
    occurrence: int,
    step_type: str,
    now: datetime,
    reuse: str | None = None,
) -> None:
    """Mark the step running for `attempt`: a new row, or the row a plan left (`reuse` =
    "planned", its first try) or an earlier attempt left unfinished ("unfinished", one more
    try)."""
    if reuse is not None:
        conn.execute(
            update(run_steps)
            .where(run_steps.c.run_id == run_id, run_steps.c.seq == seq)
            .values(
                attempt=attempt,
                occurrence=occurrence,
                status="running",
                detail=None,
                started_at=now,
                finished_at=None,
                tries=run_steps.c.tries + 1 if reuse == "unfinished" else 1,
            )
        )
        return
    conn.execute(
        run_steps.insert().values(
            run_id=run_id,
            seq=seq,
            attempt=attempt,
            name=name,
            step_type=step_type,
            status="running",
            started_at=now,
            occurrence=occurrence,
            tries=1,
        )
    )


def tried_again(conn: Connection, run_id: uuid.UUID, seq: int, *, detail: str) -> None:
    """The step raised and is retried in place: one more try, and why the last one failed."""
    conn.execute(
        update(run_steps)
        .where(run_steps.c.run_id == run_id, run_steps.c.seq == seq)
        .values(tries=run_steps.c.tries + 1, detail=detail)
    )


def complete(
    conn: Connection,
    run_id: uuid.UUID,
    attempt: int,
    seq: int,
    *,
    result: Any,
    now: datetime,
) -> bool:
    """Store the result and mark the step completed, only while `attempt` owns the run;
    False when it does not (nothing is written)."""
    owned = exists().where(
        and_(runs.c.id == run_id, runs.c.attempt == attempt, runs.c.status == Status.RUNNING)
    )
    updated = conn.execute(
        update(run_steps)
        .where(run_steps.c.run_id == run_id, run_steps.c.seq == seq, owned)
        .values(status="completed", result=result, detail=None, finished_at=now)
    ).rowcount
    return bool(updated == 1)


def fail(conn: Connection, run_id: uuid.UUID, seq: int, *, detail: str, now: datetime) -> None:
    conn.execute(
        update(run_steps)
        .where(run_steps.c.run_id == run_id, run_steps.c.seq == seq)
        .values(status="failed", detail=detail, finished_at=now)
    )
