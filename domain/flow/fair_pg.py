"""Fair-share turns on PostgreSQL through psycopg: a top-up in one round trip.

`fair.SqlTurns` (domain/flow/fair.py) says what a top-up does; this does the same in one
pipeline on a connection of the caller's thread (domain/db/driver.py), because workers top up
queues all the time: the queue's lock (the same advisory lock `fair.top_up` takes, so top-ups
of a queue still wait for each other whichever implementation gives them), then one prepared
statement that counts the runs in flight, gives the free places in turns and marks the runs
it gave; the Sync that ends the pipeline commits them (statements sent without a Sync between
them form one implicit transaction, and the lock is held until it ends). The statement comes
after the lock, not inside it: each statement reads with a snapshot taken as it starts, so the
count is taken once the previous top-up has committed, and two top-ups never fill the same
place. (Unlike `fair.top_up`, it takes the lock before knowing whether any run waits: one
round trip cannot ask first. The lock is held for the one statement, which on a queue nobody
paces finds nothing at its first index probe.)

The statement gives the turns exactly as `fair.turns` does. The k-th waiting run of a project
(its own runs oldest first) goes out with `(in_flight + k) / weight`, and giving places one at
a time to the lowest of the projects' next runs is the same as taking the lowest `free` runs
by `(that ratio, created_at, project)` all at once: within a project the ratio only grows. It
reads each project's oldest due runs in the order of ix_runs_paced (`created_at`, the ties at
the last place included, so the `id` that breaks them is sorted among a few rows, never the
backlog), and marks the chosen runs by primary key.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from domain.db.driver import ThreadConnections
from domain.flow import fair
from domain.ports import Dispatch

_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s::text, 0))"

#: Queues with due runs waiting for a turn (the relay's sweep): one probe per queue on
#: ix_runs_paced, however long the backlogs.
_QUEUES_SQL = f"""
WITH RECURSIVE waiting(queue) AS (
  SELECT (SELECT queue FROM runs WHERE {fair.WAITING_TURN_SQL} ORDER BY queue LIMIT 1)
  UNION ALL
  SELECT (SELECT queue FROM runs WHERE {fair.WAITING_TURN_SQL} AND queue > waiting.queue
          ORDER BY queue LIMIT 1)
  FROM waiting WHERE waiting.queue IS NOT NULL
)
SELECT queue FROM waiting w WHERE queue IS NOT NULL AND (
  SELECT 1 FROM runs WHERE runs.queue = w.queue AND {fair.WAITING_TURN_SQL}
    AND not_before <= %(now)s::timestamptz
  ORDER BY project, created_at LIMIT 1) IS NOT NULL
"""

# Every read is ordered as its index is (ix_runs_in_flight, ix_runs_paced), though only the
# waiting runs' order matters: with a LIMIT and no order, the planner may guess that a seq scan
# of all runs soon finds enough rows (it finds the few in flight only at the end of the table).
# `flying` counts at most `limit` + 1 runs, as fair.in_flight does: past the limit the number
# does not matter. `project COLLATE "C"` orders names as Python compares them (fair.turns).
# The UPDATE checks again that each run still waits (a cancel may have come in between), so
# only runs it marked are returned and published.
_TOP_UP_SQL = f"""
WITH RECURSIVE flying AS (
  SELECT project, count(*) AS n FROM (
    SELECT project FROM runs WHERE queue = %(queue)s::text AND {fair.IN_FLIGHT_SQL}
    ORDER BY project LIMIT %(limit)s::int8 + 1
  ) f GROUP BY project
), free AS (
  SELECT greatest(%(limit)s::int8 - coalesce(sum(n), 0), 0)::int8 AS n FROM flying
), waiting(project) AS (
  SELECT (SELECT project FROM runs WHERE queue = %(queue)s::text AND {fair.WAITING_TURN_SQL}
          ORDER BY project LIMIT 1)
  UNION ALL
  SELECT (SELECT project FROM runs WHERE queue = %(queue)s::text AND {fair.WAITING_TURN_SQL}
            AND project > waiting.project
          ORDER BY project LIMIT 1)
  FROM waiting WHERE waiting.project IS NOT NULL
), due AS (
  SELECT w.project, r.id, r.created_at,
    row_number() OVER (PARTITION BY w.project ORDER BY r.created_at, r.id) AS k
  FROM waiting w CROSS JOIN LATERAL (
    SELECT id, created_at FROM runs
    WHERE queue = %(queue)s::text AND project = w.project AND {fair.WAITING_TURN_SQL}
      AND not_before <= %(now)s::timestamptz
    ORDER BY created_at
    FETCH FIRST (SELECT n FROM free) ROWS WITH TIES
  ) r
  WHERE w.project IS NOT NULL AND (SELECT n FROM free) >= %(at_least)s::int8
), chosen AS MATERIALIZED (
  SELECT d.id, row_number() OVER (ORDER BY
    (coalesce(f.n, 0) + d.k)::float8 / greatest(coalesce(p.weight, 1), 1),
    d.created_at, d.project COLLATE "C") AS turn
  FROM due d
  LEFT JOIN flying f ON f.project = d.project
  LEFT JOIN projects p ON p.name = d.project
  WHERE d.k <= (SELECT n FROM free)
  ORDER BY turn
  FETCH FIRST (SELECT n FROM free) ROWS ONLY
), marked AS (
  UPDATE runs SET dispatched_at = %(now)s::timestamptz, dispatch_attempts = dispatch_attempts + 1
  WHERE id = ANY(ARRAY(SELECT id FROM chosen)) AND {fair.WAITING_TURN_SQL}
  RETURNING id, name, priority, params
)
SELECT m.id, m.name, m.priority, m.params FROM marked m JOIN chosen c ON c.id = m.id
ORDER BY c.turn
"""


class PgTurns:
    """`fair.Turns` for one process, on connections of the caller's thread."""

    def __init__(self, connections: ThreadConnections) -> None:
        self._connections = connections

    def give(
        self, queues: Iterable[str] | None, *, limit: int, now: datetime, at_least: int = 1
    ) -> list[Dispatch]:
        """`fair.SqlTurns.give`: each queue's lock, then its statement, in one transaction
        and one round trip (queues in order, so two callers lock them alike)."""
        with self._connections.connection() as raw:
            if queues is None:
                queues = [q for (q,) in raw.execute(_QUEUES_SQL, {"now": now}, prepare=True)]
            ordered = sorted(set(queues))
            if not ordered:
                return []
            given: list[tuple[str, Any]] = []
            with raw.pipeline():
                for queue in ordered:
                    raw.execute(_LOCK_SQL, {"key": fair.LOCK + queue}, prepare=True)
                    params = {
                        "queue": queue,
                        "limit": limit,
                        "now": now,
                        "at_least": max(at_least, 1),
                    }
                    given.append((queue, raw.execute(_TOP_UP_SQL, params, prepare=True)))
            # The pipeline's Sync has committed the marks; the rows arrived with it.
            return [
                Dispatch(row[0], row[1], queue, row[2], row[3])
                for queue, cursor in given
                for row in cursor.fetchall()
            ]
