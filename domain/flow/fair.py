"""Fair share between projects on a busy queue: starts rotate between projects, by weight.

Celery's queues are FIFO: had project A's 5,000 runs all been published, project B's 10 would
start after them. So a queue keeps at most `dispatch_in_flight` runs published and unclaimed
(in the broker or prefetched by a worker); past that, a new run is written `paced`, unpublished,
and waits for its project's turn. PostgreSQL remains the one queue of record (guarantee 1: the
run is committed before anything is sent, and nothing depends on the broker keeping it).

Turns (`top_up`): with the queue's lock held, count the runs in flight per project, then give
the free places one at a time to the project with the fewest in flight for its weight
(`(in_flight + given + 1) / weight`, the oldest waiting run breaking ties), each project's own
runs oldest first (priorities order runs once they are published, as without pacing). A
project with nothing in flight goes first, so B's 10 go out before A's next ones; with both
busy, places alternate in the ratio of the weights.

Who calls it: the enqueue that made paced runs while a quarter of their queue's places were
free (after its commit), a worker claiming runs (each claim frees a place: every
`top_up_at(limit)`-th claim of a queue it tops the queue up), and the relay on each sweep as
the net for a top-up lost with its worker. A top-up waits for a quarter of the places
(`top_up_at`) so that one serves several runs: a producer that outruns the workers would
otherwise top up at nearly every enqueue, one place at a time, as each claim frees one. They
take their turns from a `Turns` (domain/storage.py `turn_giver`): `SqlTurns` here, or on
PostgreSQL the same top-up in one round trip (domain/flow/fair_pg.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, and_, func, select, text, update

from domain.db import sql
from domain.db.models import projects, runs
from domain.ports import Dispatch
from domain.runs.states import Status

#: The lock (per queue) under which turns are given.
LOCK = "pace:"


def top_up_at(limit: int) -> int:
    """How many free places of a queue's `limit` are worth a top-up: a quarter of them."""
    return max(1, limit // 4)


#: The two conditions below as SQL text, for the prepared statements of the single enqueue
#: (domain/runs/insert_pg.py) and of the top-up (domain/flow/fair_pg.py); they are the
#: predicates of ix_runs_in_flight and ix_runs_paced, written out (not bound) so that a
#: prepared statement's generic plan can still use those partial indexes.
IN_FLIGHT_SQL = f"status = '{Status.PENDING}' AND dispatched_at IS NOT NULL"
WAITING_TURN_SQL = f"paced AND dispatched_at IS NULL AND status = '{Status.PENDING}'"


def _in_flight(queue: str) -> Any:
    return and_(
        runs.c.queue == queue, runs.c.status == Status.PENDING, runs.c.dispatched_at.is_not(None)
    )


def _waiting_turn(queue: str | None = None) -> Any:
    waiting = and_(runs.c.paced, runs.c.dispatched_at.is_(None), runs.c.status == Status.PENDING)
    return waiting if queue is None else and_(runs.c.queue == queue, waiting)


def in_flight(conn: Connection, queue: str, *, most: int) -> dict[str, int]:
    """Runs of `queue` published and not yet claimed, per project (counting at most `most` + 1:
    past the limit the exact number does not matter)."""
    some = select(runs.c.project).where(_in_flight(queue)).limit(most + 1).subquery()
    counted = select(some.c.project, func.count()).group_by(some.c.project)
    return {project: n for project, n in conn.execute(counted)}


def pace(conn: Connection, rows: list[dict[str, Any]], *, limit: int) -> set[str]:
    """At enqueue, in its transaction: the rows about to be published whose queue is busy (its
    in-flight runs and these past `limit`, or runs already waiting for a turn there) are made
    paced instead, to go out in turns. Returns those of them with a quarter of their places
    free (`top_up_at`: to top up after commit; the others are topped up by the claims that
    free their places)."""
    adding = Counter(row["queue"] for row in rows if row["dispatched_at"] is not None)
    busy, free = set(), set()
    for queue, n in adding.items():
        flying = (
            select(func.count())
            .select_from(select(runs.c.id).where(_in_flight(queue)).limit(limit + 1).subquery())
            .scalar_subquery()
        )
        waiting = select(runs.c.id).where(_waiting_turn(queue)).limit(1).exists()
        count, queued = conn.execute(select(flying, waiting)).one()
        if queued or count + n > limit:
            busy.add(queue)
            if limit - count >= top_up_at(limit):
                free.add(queue)
    for row in rows:
        if row["queue"] in busy and row["dispatched_at"] is not None:
            row.update(paced=True, dispatched_at=None, dispatch_attempts=0)
    return free


def top_up(
    conn: Connection, queue: str, *, limit: int, now: datetime, at_least: int = 1
) -> list[Dispatch]:
    """Give the queue's free places (`limit` minus its runs in flight) to the runs waiting for
    a turn, in turns between projects; marks them published (the caller publishes them after
    commit) and returns them. Nothing when fewer than `at_least` places are free."""
    if not conn.execute(select(select(runs.c.id).where(_waiting_turn(queue)).exists())).scalar():
        return []  # the common case for a claim on a queue nobody paces: one index probe
    sql.lock_key(conn, LOCK + queue)
    flying = in_flight(conn, queue, most=limit)
    free = limit - sum(flying.values())
    if free < max(at_least, 1):
        return []
    due = and_(_waiting_turn(queue), runs.c.not_before <= now)
    by_project: dict[str, list[Any]] = {}
    for project in projects_waiting(
        conn, queue
    ):  # each project's oldest, by the index: never the whole backlog
        oldest = list(
            conn.execute(
                select(
                    runs.c.id,
                    runs.c.name,
                    runs.c.priority,
                    runs.c.params,
                    runs.c.created_at,
                )
                .where(due, runs.c.project == project)
                .order_by(runs.c.created_at, runs.c.id)
                .limit(free)
            )
        )
        if oldest:  # none may be due yet (a run created a moment after `now`)
            by_project[project] = oldest
    if not by_project:
        return []
    weights = dict(
        conn.execute(
            select(projects.c.name, projects.c.weight).where(projects.c.name.in_(by_project))
        ).all()
    )
    chosen = turns(by_project, flying, weights, free)
    conn.execute(
        update(runs)
        .where(runs.c.id.in_([r.id for r in chosen]))
        .values(dispatched_at=now, dispatch_attempts=runs.c.dispatch_attempts + 1)
    )
    return [Dispatch(r.id, r.name, queue, r.priority, r.params) for r in chosen]


#: The projects with runs waiting for a turn in a queue, one index probe per project (a loose
#: index scan over ix_runs_paced), however long the backlog: a GROUP BY read every entry.
_PROJECTS_WAITING = text(
    """
WITH RECURSIVE waiting(project) AS (
    SELECT (SELECT project FROM runs
            WHERE queue = :queue AND paced AND dispatched_at IS NULL AND status = 'pending'
            ORDER BY project LIMIT 1)
    UNION ALL
    SELECT (SELECT project FROM runs
            WHERE queue = :queue AND paced AND dispatched_at IS NULL AND status = 'pending'
              AND project > waiting.project
            ORDER BY project LIMIT 1)
    FROM waiting WHERE waiting.project IS NOT NULL
)
SELECT project FROM waiting WHERE project IS NOT NULL
"""
)


def projects_waiting(conn: Connection, queue: str) -> list[str]:
    """The projects with runs waiting for a turn in `queue`."""
    return list(conn.execute(_PROJECTS_WAITING, {"queue": queue}).scalars())


def turns(
    waiting: dict[str, list[Any]], flying: dict[str, int], weights: dict[str, int], places: int
) -> list[Any]:
    """Up to `places` of the waiting runs (per project, in the order they go), each place to
    the project with the fewest in flight for its weight; ties to the oldest waiting run."""
    given: Counter[str] = Counter()
    heads = {project: 0 for project, oldest in waiting.items() if oldest}
    chosen: list[Any] = []
    while len(chosen) < places and heads:
        project = min(
            heads,
            key=lambda p: (
                (flying.get(p, 0) + given[p] + 1) / max(weights.get(p, 1), 1),
                waiting[p][heads[p]].created_at,
                p,
            ),
        )
        chosen.append(waiting[project][heads[project]])
        given[project] += 1
        heads[project] += 1
        if heads[project] >= len(waiting[project]):
            del heads[project]
    return chosen


def queues_waiting(conn: Connection, *, now: datetime) -> list[str]:
    """Queues with runs waiting for a turn that are due (for the relay's sweep)."""
    return list(
        conn.execute(
            select(runs.c.queue).where(_waiting_turn(), runs.c.not_before <= now).distinct()
        ).scalars()
    )


def top_up_all(
    conn: Connection, queues: Iterable[str], *, limit: int, now: datetime, at_least: int = 1
) -> list[Dispatch]:
    """`top_up` each queue, in order (so two callers lock them alike)."""
    sent: list[Dispatch] = []
    for queue in sorted(set(queues)):
        sent.extend(top_up(conn, queue, limit=limit, now=now, at_least=at_least))
    return sent


class Turns(Protocol):
    """Gives queues their turns: each queue's free places to its waiting runs, marked
    published in the transaction that chose them (committed on return: the caller publishes
    them, or hands them back to the relay)."""

    def give(
        self, queues: Iterable[str] | None, *, limit: int, now: datetime, at_least: int = 1
    ) -> list[Dispatch]:
        """`top_up_all` of `queues` (None: every queue with due runs waiting for a turn)."""
        ...


class SqlTurns:
    """`Turns` on any database, through SQLAlchemy: `top_up_all` in one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def give(
        self, queues: Iterable[str] | None, *, limit: int, now: datetime, at_least: int = 1
    ) -> list[Dispatch]:
        with self.engine.begin() as conn:
            if queues is None:
                queues = queues_waiting(conn, now=now)
            return top_up_all(conn, queues, limit=limit, now=now, at_least=at_least)
