"""Waking a run that gathers its children, without it polling.

A run in `ctx.gather` waits (reason `children`). When the runs it gathers are all of its own
unfinished children, the relay's sweep (`wake_gatherers`) makes it due as soon as the last of
them has ended, so an idle gatherer costs nothing however long its children take; its own wake
time is only a net (GATHER_NET_S). A run that gathers some of its children while others are
still going, or runs that are not its children, looks again every GATHER_POLL_S instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import Connection, Engine, exists, func, select, update

from domain.db.models import runs
from domain.runs.states import TERMINAL, Status

#: The wait reason of a gathering run.
REASON = "children"
#: How often a gatherer the sweep cannot wake looks at the runs it gathers.
GATHER_POLL_S = 1.0
#: The wake time of a gatherer the sweep wakes: only a net, should a sweep be missed.
GATHER_NET_S = 60.0


def woken_by_sweep(conn: Connection, run_id: uuid.UUID, gathered: Collection[uuid.UUID]) -> bool:
    """Whether every unfinished child of `run_id` is among `gathered` (and `gathered` are
    all its children): then "no unfinished child" is the gather's own condition."""
    kids = runs.alias("kids")
    outside = conn.execute(
        select(func.count())
        .select_from(kids)
        .where(
            kids.c.parent_run_id == run_id,
            kids.c.status.not_in(list(TERMINAL)),
            kids.c.id.not_in(list(gathered)),
        )
    ).scalar_one()
    if outside:
        return False
    theirs = conn.execute(
        select(func.count()).where(runs.c.id.in_(list(gathered)), runs.c.parent_run_id == run_id)
    ).scalar_one()
    return bool(theirs == len(set(gathered)))


def wake_gatherers(engine: Engine, *, now: datetime) -> int:
    """Make due every gathering run none of whose children is unfinished (one statement,
    by the waiting-runs index and the children index); the number woken."""
    kids = runs.alias("kids")
    unfinished = exists().where(
        kids.c.parent_run_id == runs.c.id, kids.c.status.not_in(list(TERMINAL))
    )
    with engine.begin() as conn:
        woken = conn.execute(
            update(runs)
            .where(
                runs.c.status == Status.WAITING,
                runs.c.wait_reason == REASON,
                runs.c.not_before > now,
                ~unfinished,
            )
            .values(not_before=now, dispatched_at=None)
        ).rowcount
    return int(woken or 0)
