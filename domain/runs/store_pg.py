"""RunStore on PostgreSQL: claim and finish as one prepared statement each.

`store.claim` and `store.finish` (domain/runs/store.py) say what these do; this module does the
same with fewer round trips and no statement building per call, because a worker runs them for
every run:
- each statement runs in autocommit mode: a single statement is its own transaction, so the
  explicit BEGIN and COMMIT round trips go away and the guarantees stay (a claim is still one
  conditional UPDATE; a finish is still fenced by `attempt`);
- `finish` inserts the run's last buffered log lines in the same statement (a data-modifying
  CTE reading them from one JSON parameter), so a short run costs two round trips in all:
  claim, finish;
- the SQL text is constant and prepared on first use per connection (psycopg `prepare=True`).

Only the plain case takes this path (a task run with no follow-up to chain and no metric or
cost rows left to write; a claim with no limit to check, see domain/costs/admission.py); everything
else goes through domain/runs/store.py and SQLAlchemy.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Engine

from domain.costs import admission
from domain.costs.admission import Refused
from domain.db.driver import ThreadConnections
from domain.flow import concurrency
from domain.runs import steps
from domain.runs import store as runstore
from domain.runs.states import Status
from domain.runs.store import Claim, Finished, Slot

#: Above this many lines the finish writes them with COPY (the runstore path) instead.
MAX_INLINE_LINES = 500

_CLAIM_FIELDS = (
    "id, name, kind, project, params, attempt, max_attempts, timeout_s, budget_usd, "
    "max_requests, max_minutes, started_at, queue, priority, triggered_by, paced, "
    "concurrency_key, concurrency_max"
)

#: Runs the prepared claim takes: nothing to admit (domain/costs/admission.py), no rate limit
#: to take from, and no concurrency key or one with room for the run (the gate of
#: domain/flow/concurrency.py as the function of migration 0018, which holds the key's lock
#: until the claim commits). A run it leaves takes the general path, which says why it waits.
_TAKES_AT_ONCE_SQL = f"""{admission.NOTHING_TO_CHECK_SQL}
  AND rate_limit IS NULL AND (concurrency_key IS NULL OR conveyor_key_has_room(
    id, concurrency_key, concurrency_max, created_at, %(now)s))"""

_CLAIM_SQL = f"""
UPDATE runs SET status = '{Status.RUNNING}',
  attempt = CASE WHEN status = '{Status.WAITING}' THEN attempt ELSE attempt + 1 END,
  wait_reason = NULL, lease_owner = %(owner)s, lease_expires_at = %(lease)s,
  -- A keyed run may have waited for its key's lock: it starts when it got it, not before
  -- the end of the run that held the slot (as runstore.claim_checked does).
  started_at = coalesce(started_at, CASE WHEN concurrency_key IS NULL THEN %(now)s
                                    ELSE greatest(%(now)s, clock_timestamp()) END)
WHERE id = %(id)s AND (
  (status IN ('{Status.PENDING}', '{Status.WAITING}') AND not_before <= %(now)s)
  OR (status = '{Status.RUNNING}' AND lease_expires_at < %(now)s AND attempt < max_attempts)
) AND {_TAKES_AT_ONCE_SQL}
RETURNING {_CLAIM_FIELDS}
"""

# The lines are inserted whether or not the fence holds: an attempt's lines are kept even when
# it lost its lease (they are labelled with their attempt), exactly as the runstore path does.
# They are inserted only while the run exists (run_logs has no foreign key): `done` holds the
# run locked when the fence held; otherwise `owner` locks it as lines.lock_for_lines does.
# (When `done` updated the row, `owner` finds it changed by this very statement and returns
# nothing; `done` answers for it then.)
_FINISH_CTES = f"""
WITH done AS (
  UPDATE runs SET status = %(status)s, result = %(result)s, error_type = %(error_type)s,
    error = %(error)s, exit_code = %(exit_code)s, finished_at = %(now)s,
    lease_owner = NULL, lease_expires_at = NULL
  WHERE id = %(id)s AND attempt = %(attempt)s AND status = '{Status.RUNNING}'
  RETURNING 1
), owner AS (
  SELECT 1 FROM runs WHERE id = %(id)s FOR KEY SHARE
), lines AS (
  INSERT INTO run_logs (run_id, seq, attempt, ts, stream, level, message, fields)
  SELECT %(id)s, * FROM jsonb_to_recordset(%(lines)s) AS l(
    seq int8, attempt int4, ts timestamptz, stream text, level text, message text, fields jsonb)
  WHERE EXISTS (SELECT 1 FROM done) OR EXISTS (SELECT 1 FROM owner)
)"""

_FINISH_SQL = f"{_FINISH_CTES}\nSELECT count(*) FROM done\n"

#: The finish of a run that held a concurrency key's slot: the same, and the key's refill
#: (migration 0018) when the fence held, in the same statement. `done` has updated the row
#: by the time the refill runs (the refill reads done's row), but the refill's own snapshot
#: need not show that, so it is told the run ended (`p_ended`) rather than left to count it.
_FINISH_HOLDING_SQL = f"""{_FINISH_CTES}, woken AS (
  SELECT w.* FROM done, conveyor_key_refill(
    %(key)s, %(most)s, %(now)s, %(publishing)s, %(id)s) AS w
)
SELECT (SELECT count(*) FROM done), w.id, w.name, w.queue, w.params
FROM (SELECT 1) AS one LEFT JOIN woken AS w ON true
"""


_STEP_COLUMNS = (
    "run_id, seq, name, step_type, attempt, occurrence, status, result, detail, started_at, "
    "finished_at, tries"
)
_STEP_OWNED = (
    f"EXISTS (SELECT 1 FROM runs WHERE id = %(run_id)s AND attempt = %(attempt)s "
    f"AND status = '{Status.RUNNING}')"
)
_STEP_INSERT_SQL = f"""
INSERT INTO run_steps ({_STEP_COLUMNS})
SELECT %(run_id)s, %(seq)s, %(name)s, %(step_type)s, %(attempt)s, %(occurrence)s, %(status)s,
  %(result)s, %(detail)s, %(started_at)s, %(finished_at)s, %(tries)s
WHERE {_STEP_OWNED}
RETURNING seq
"""
_STEP_UPDATE_SQL = f"""
UPDATE run_steps SET attempt = %(attempt)s, occurrence = %(occurrence)s, status = %(status)s,
  result = %(result)s, detail = %(detail)s, started_at = %(started_at)s,
  finished_at = %(finished_at)s, tries = %(tries)s
WHERE run_id = %(run_id)s AND seq = %(seq)s AND {_STEP_OWNED}
RETURNING seq
"""


def _json_line(line: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": line["seq"],
        "attempt": line["attempt"],
        "ts": line["ts"].isoformat(),
        "stream": line["stream"],
        "level": line["level"],
        "message": line["message"],
        "fields": line["fields"],
    }


class PgRunStore:
    """Claim and finish for one worker process.

    Each thread that calls it (one in a prefork child, one per pool thread with `-P threads`)
    gets a connection of its own (domain/db/driver.py).
    """

    max_inline_lines = MAX_INLINE_LINES

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connections = ThreadConnections(engine)
        self._connection = self._connections.connection

    def close(self) -> None:
        self._connections.close()

    def claim(
        self, run_id: uuid.UUID, *, owner: str, now: datetime, lease_s: float
    ) -> Claim | Refused | None:
        """`runstore.claim`: the prepared statement takes runs with nothing to check; a run
        it leaves (limits to check, or not claimable at all) goes through the general path."""
        params = {
            "id": run_id,
            "owner": owner,
            "now": now,
            "lease": now + timedelta(seconds=lease_s),
        }
        with self._connection() as raw:
            row = raw.execute(_CLAIM_SQL, params, prepare=True).fetchone()
        if row is None:
            with self.engine.begin() as conn:
                return runstore.claim_checked(conn, run_id, owner=owner, now=now, lease_s=lease_s)
        return Claim(
            run_id=row[0],
            name=row[1],
            kind=row[2],
            project=row[3],
            params=row[4],
            attempt=row[5],
            max_attempts=row[6],
            timeout_s=row[7],
            budget_usd=row[8],
            max_requests=row[9],
            max_minutes=row[10],
            started_at=row[11].astimezone(UTC),
            queue=row[12],
            priority=row[13],
            triggered_by=row[14],
            paced=row[15],
            concurrency_key=row[16],
            concurrency_max=row[17],
        )

    def record_step(
        self, run_id: uuid.UUID, attempt: int, outcome: steps.Outcome, *, reuse: bool
    ) -> bool:
        """`steps.record` as one prepared statement on this thread's connection."""
        params = {
            "run_id": run_id,
            "attempt": attempt,
            "seq": outcome.seq,
            "name": outcome.name,
            "step_type": outcome.step_type,
            "occurrence": outcome.occurrence,
            "status": outcome.status,
            "result": None if outcome.result is None else Jsonb(outcome.result),
            "detail": outcome.detail,
            "started_at": outcome.started_at,
            "finished_at": outcome.finished_at,
            "tries": outcome.tries,
        }
        sql = _STEP_UPDATE_SQL if reuse else _STEP_INSERT_SQL
        with self._connection() as raw:
            return raw.execute(sql, params, prepare=True).fetchone() is not None

    def finish(
        self,
        run_id: uuid.UUID,
        attempt: int,
        *,
        status: str,
        now: datetime,
        result: Any,
        error_type: str | None,
        error: str | None,
        exit_code: int | None,
        lines: Sequence[dict[str, Any]],
        slot: Slot | None = None,
    ) -> Finished:
        """Write the final state and the last lines; not `owned` when another attempt owns
        the run (the lines are written all the same). With a `slot`, the same statement hands
        it on (`conveyor_key_refill`) if the fence held."""
        params: dict[str, Any] = {
            "id": run_id,
            "attempt": attempt,
            "status": status,
            "now": now,
            "result": Jsonb(result),
            "error_type": error_type,
            "error": error,
            "exit_code": exit_code,
            # One JSON document for all lines: dumped by json.dumps in C, not per value.
            "lines": Jsonb([_json_line(line) for line in lines]),
        }
        with self._connection() as raw:
            if slot is None:
                row = raw.execute(_FINISH_SQL, params, prepare=True).fetchone()
                return Finished(bool(row and row[0] == 1))
            params.update(key=slot.key, most=slot.most, publishing=slot.publishing)
            rows = raw.execute(_FINISH_HOLDING_SQL, params, prepare=True).fetchall()
        owned = bool(rows and rows[0][0] == 1)
        return Finished(owned, tuple(concurrency.handed_on(r[1:] for r in rows if r[1])))
