"""Checkpointed steps: once a step completed, its row holds its result, and every later attempt
of the run returns that result instead of calling the step again.

A checkpointed step is identified by its name and occurrence (the n-th step of that name the
run reached), so a loop of steps works. The run's history is its completed checkpointed steps
in the order it reached them; an attempt must reach them in that order (worker/steps.py checks
it). Completing a step is fenced by attempt, like every write of a running run: an attempt
that lost its lease cannot record a result over the attempt that replaced it.

A checkpointed step's row is written once, when it completed or failed, in one statement (one
round trip on PostgreSQL): its start is kept in memory meanwhile. So a step interrupted with
its worker leaves no row, and the next attempt runs it as if for the first time.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, exists, literal, or_, select, update

from domain.db.models import run_steps
from domain.runs import fence


@dataclass(frozen=True, slots=True)
class Done:
    """A completed checkpointed step: what a later attempt returns without running it."""

    seq: int
    name: str
    occurrence: int
    result: Any


@dataclass(frozen=True, slots=True)
class Earlier:
    """A row the step already has: a plan's, or a failed try of an earlier attempt."""

    seq: int
    tries: int  # 0 for a planned row: its function was never called


@dataclass(frozen=True, slots=True)
class History:
    #: Completed checkpointed steps, in the order the run reached them.
    done: list[Done] = field(default_factory=list)
    #: (name, occurrence) -> a checkpointed step that failed in an earlier attempt: it runs
    #: again and keeps its row, adding its tries.
    failed: dict[tuple[str, int], Earlier] = field(default_factory=dict)
    #: Names of every checkpointed step the run has a row for (not planned again).
    names: frozenset[str] = frozenset()
    #: name -> seq of a step an earlier attempt planned and never reached (planned again, it
    #: keeps that row).
    planned: dict[str, int] = field(default_factory=dict)


def history(conn: Connection, run_id: uuid.UUID) -> History:
    """The run's checkpointed steps as its earlier attempts left them (one query)."""
    rows = conn.execute(
        select(
            run_steps.c.seq,
            run_steps.c.name,
            run_steps.c.occurrence,
            run_steps.c.status,
            run_steps.c.result,
            run_steps.c.tries,
        )
        .where(
            run_steps.c.run_id == run_id,
            or_(run_steps.c.occurrence.is_not(None), run_steps.c.status == "planned"),
        )
        .order_by(run_steps.c.seq)
    ).all()
    planned = {r.name: r.seq for r in rows if r.occurrence is None}
    rows = [r for r in rows if r.occurrence is not None]
    done = [Done(r.seq, r.name, r.occurrence, r.result) for r in rows if r.status == "completed"]
    failed = {
        (r.name, r.occurrence): Earlier(r.seq, r.tries) for r in rows if r.status != "completed"
    }
    return History(done, failed, frozenset(r.name for r in rows), planned)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt's call of a checkpointed step ended, to be written as its row."""

    seq: int
    name: str
    occurrence: int
    step_type: str
    started_at: datetime
    finished_at: datetime
    tries: int  # with the tries of the row it reuses
    status: str  # completed or failed
    result: Any = None
    detail: str | None = None


def record(
    conn: Connection, run_id: uuid.UUID, attempt: int, outcome: Outcome, *, reuse: bool
) -> bool:
    """Write the step's row as `outcome` says, in one statement, only while `attempt` owns
    the run (a completed step's result is fenced; so is a failure, which no later attempt
    would want to read over its own). `reuse`: the step has a row already (planned, or failed
    before) to update. False when the attempt no longer owns the run: nothing is written."""
    owned = exists().where(fence.owned(run_id, attempt))
    values = {
        "attempt": attempt,
        "occurrence": outcome.occurrence,
        "status": outcome.status,
        "result": outcome.result,
        "detail": outcome.detail,
        "started_at": outcome.started_at,
        "finished_at": outcome.finished_at,
        "tries": outcome.tries,
    }
    if reuse:
        stmt: Any = (
            update(run_steps)
            .where(run_steps.c.run_id == run_id, run_steps.c.seq == outcome.seq, owned)
            .values(values)
            .returning(run_steps.c.seq)
        )
    else:
        row = {
            "run_id": run_id,
            "seq": outcome.seq,
            "name": outcome.name,
            "step_type": outcome.step_type,
            **values,
        }
        columns = list(row)
        stmt = (
            run_steps.insert()
            .from_select(
                columns,
                select(*[literal(row[c], type_=run_steps.c[c].type) for c in columns]).where(owned),
            )
            .returning(run_steps.c.seq)
        )
    return conn.execute(stmt).first() is not None


def set_result(conn: Connection, run_id: uuid.UUID, attempt: int, seq: int, *, result: Any) -> bool:
    """Replace a completed step's result (a wait that has now received its signal), only
    while `attempt` owns the run; False when it does not."""
    owned = exists().where(fence.owned(run_id, attempt))
    return (
        conn.execute(
            update(run_steps)
            .where(run_steps.c.run_id == run_id, run_steps.c.seq == seq, owned)
            .values(result=result)
            .returning(run_steps.c.seq)
        ).first()
        is not None
    )
