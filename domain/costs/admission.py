"""Admission at claim: a run starts only while its project's month and its parent's budget
have room, so a monthly limit binds before the money is spent, not after.

The rule, in one place (`refusal`): a run is refused when its project has spent its monthly
cost limit (or used its token limit) in the current calendar month (UTC), or when its parent
run (a run that spawned or chained it; a retry's previous run is not a parent here, since a
retry is asked for with a budget of its own) has a `budget_usd` and has spent it. A refused run
never starts: it is ended `budget_exceeded` with the reason, or, when its project says
`on_limit = "hold"` and the limit is the project's, kept pending with `not_before` moved
`HOLD_RECHECK_S` ahead (at most to the next month), so it holds no worker and the relay
delivers it again to be checked again.

The bound this gives: a project's spend exceeds its limit by at most what the calls already
in flight when it was reached spend.

Both stores claim the same way: first one conditional UPDATE that only admits runs with
nothing to check (`NOTHING_TO_CHECK`: a project without monthly limits, no parent whose
budget could matter; one primary-key lookup of the project), and only when that claims
nothing, `admit`: one read of the facts (the project's limits and its month's usage row, both
by primary key, and the parent by primary key), the rule in Python (money stays exact on every
database), then the claim or the refusal as one conditional UPDATE.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, and_, exists, or_, select, update

from domain.costs import ledger as costs
from domain.db.models import projects, runs
from domain.pipelines import store as pipeline_store
from domain.ports import Dispatch
from domain.runs.states import Status

#: How long a held run waits before it is delivered and checked again.
HOLD_RECHECK_S = 30.0
ON_LIMIT = ("stop", "hold")

_parent = runs.alias("parent")

#: Runs that need no admission check: no parent whose budget could stop them, and a project
#: without monthly limits. The fast path's claim admits only these.
NOTHING_TO_CHECK = and_(
    or_(runs.c.parent_run_id.is_(None), runs.c.triggered_by == "retry"),
    ~exists().where(
        projects.c.name == runs.c.project,
        or_(
            projects.c.monthly_cost_limit_usd.is_not(None),
            projects.c.monthly_token_limit.is_not(None),
        ),
    ),
)

#: The same condition as SQL text, for the prepared statement of the PostgreSQL fast path.
NOTHING_TO_CHECK_SQL = """(parent_run_id IS NULL OR triggered_by = 'retry')
  AND NOT EXISTS (SELECT 1 FROM projects p WHERE p.name = runs.project
    AND (p.monthly_cost_limit_usd IS NOT NULL OR p.monthly_token_limit IS NOT NULL))"""


@dataclass(frozen=True, slots=True)
class Refused:
    """A claim that did not start the run: ended `budget_exceeded` (`held` False), or left
    pending until `recheck_at` (`held` True), or made to wait (`waits`: its wait reason, as
    for a run waiting for a concurrency slot)."""

    run_id: uuid.UUID
    held: bool
    reason: str
    recheck_at: datetime | None = None
    waits: str | None = None
    #: It had waited for its project's turn in this queue: waiting now, it frees its place
    #: there (domain/flow/fair.py), as a claim would.
    turn_queue: str | None = None
    #: Runs the claim made due (a key's older waiters), unpublished: the worker sends them.
    woken: tuple[Dispatch, ...] = ()


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rule reads about one claimable run."""

    project: str
    cost_limit: Decimal | None
    token_limit: int | None
    on_limit: str
    spent_usd: Decimal
    tokens: int
    parent_id: uuid.UUID | None
    parent_budget_usd: Decimal | None
    parent_cost_usd: Decimal


def refusal(facts: Facts, month: Any) -> tuple[str, bool] | None:
    """Why the run must not start, and whether the project's policy holds it; None: admit."""
    if facts.parent_budget_usd is not None and facts.parent_cost_usd >= facts.parent_budget_usd:
        return (
            f"parent run {facts.parent_id} has spent {_usd(facts.parent_cost_usd)} USD of its "
            f"{_usd(facts.parent_budget_usd)} USD budget_usd; the run was not started",
            False,
        )
    hold = facts.on_limit == "hold"
    if facts.cost_limit is not None and facts.spent_usd >= facts.cost_limit:
        return (
            f"project {facts.project!r} has spent {_usd(facts.spent_usd)} USD of its "
            f"{_usd(facts.cost_limit)} USD monthly limit in {month:%Y-%m}; the run was not started",
            hold,
        )
    if facts.token_limit is not None and facts.tokens >= facts.token_limit:
        return (
            f"project {facts.project!r} has used {facts.tokens} of its {facts.token_limit} "
            f"monthly tokens in {month:%Y-%m}; the run was not started",
            hold,
        )
    return None


def _usd(amount: Decimal) -> str:
    return format(amount.normalize(), "f")  # 0.0500000000 (as stored) reads 0.05


def _facts(conn: Connection, run_id: uuid.UUID, claimable: Any, month: Any) -> Facts | None:
    usage = costs.usage
    row = conn.execute(
        select(
            runs.c.project,
            projects.c.monthly_cost_limit_usd,
            projects.c.monthly_token_limit,
            projects.c.on_limit,
            usage.c.cost_usd,
            usage.c.tokens,
            _parent.c.id,
            _parent.c.budget_usd,
            _parent.c.cost_usd,
        )
        .select_from(
            runs.join(projects, projects.c.name == runs.c.project)
            .outerjoin(usage, and_(usage.c.project == runs.c.project, usage.c.month == month))
            .outerjoin(
                _parent,
                and_(_parent.c.id == runs.c.parent_run_id, runs.c.triggered_by != "retry"),
            )
        )
        .where(runs.c.id == run_id, claimable)
    ).first()
    if row is None:
        return None
    return Facts(
        project=row[0],
        cost_limit=None if row[1] is None else Decimal(row[1]),
        token_limit=row[2],
        on_limit=row[3],
        spent_usd=Decimal(row[4] or 0),
        tokens=int(row[5] or 0),
        parent_id=row[6],
        parent_budget_usd=None if row[7] is None else Decimal(row[7]),
        parent_cost_usd=Decimal(row[8] or 0),
    )


def admit(conn: Connection, run_id: uuid.UUID, claimable: Any, *, now: datetime) -> Refused | bool:
    """Check a claimable run against its limits, in the caller's transaction. True: it may be
    claimed; False: it is not claimable (not ours); Refused: it was ended or held, here."""
    month = costs.month_of(now)
    facts = _facts(conn, run_id, claimable, month)
    if facts is None:
        return False
    verdict = refusal(facts, month)
    if verdict is None:
        return True
    reason, hold = verdict
    recheck_at: datetime | None = None
    if hold:
        next_month = (month.replace(day=28) + timedelta(days=4)).replace(day=1)
        recheck_at = min(
            now + timedelta(seconds=HOLD_RECHECK_S),
            datetime(next_month.year, next_month.month, 1, tzinfo=UTC),
        )
        reason = f"{reason}; held: checked again at {recheck_at:%Y-%m-%dT%H:%M:%SZ}"
        values: dict[str, Any] = {
            "status": Status.PENDING,
            "not_before": recheck_at,
            "dispatched_at": None,
            "error_type": "MonthlyLimitReached",
        }
    else:
        values = {
            "status": Status.BUDGET_EXCEEDED,
            "finished_at": now,
            "error_type": "BudgetExceeded",
        }
    written = conn.execute(
        update(runs)
        .where(runs.c.id == run_id, claimable)
        .values(error=reason, lease_owner=None, lease_expires_at=None, **values)
        .returning(runs.c.kind, runs.c.name, runs.c.triggered_by)
    ).first()
    if written is None:
        return False  # another worker took it between the read and the write
    if not hold and written.kind == "pipeline":  # counters move with the final state
        pipeline_store.record_outcome(
            conn, written.name, Status.BUDGET_EXCEEDED, written.triggered_by
        )
    return Refused(run_id, held=hold, reason=reason, recheck_at=recheck_at)
