"""The cost ledger beyond one run: a project's monthly usage, and spend recorded against it.

Prices are in prices.py, headroom taken before a call in reservations.py, sums in reports.py.

Monthly limits are checked where the money is committed: `reserve()` takes headroom with one
conditional UPDATE of the project's `project_usage` row (PostgreSQL re-checks the condition
under the row lock, so concurrent runs cannot all pass the same check), and `record()` adds
actual spend in the same transaction as the run's cost entry.

The bound, stated exactly: a project's recorded spend in a month never exceeds its limit by
more than what runs spend beyond their own reservations. A task that reserves before each
call and spends within its reservation can never push the project over the limit. And since
no run starts while its project is at a limit (domain/costs/admission.py, at claim), what runs
spend beyond their reservations past the limit is the calls in flight when it was reached.

Runs with nothing to check per call (no budget_usd or max_requests, a project without monthly
limits when the run recorded its first cost, outside a reservation) do not come through
`record()`: the worker's log writer batches their entries and `add_to_run` adds each batch to
the run's totals and `add_usage` to the month, in the batch's transaction. Whether a run can
be batched is decided once per attempt, at its first cost: a limit set after that is checked
from the run's next attempt and in every run that records its first cost later; until then
that attempt's spend is counted but not checked (so it adds to the bound above).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, cast

import structlog
from sqlalchemy import Connection, Join, Table, and_, bindparam, select, update

from domain.costs import run_spend
from domain.db import sql
from domain.db.capabilities import capabilities
from domain.db.models import projects, runs
from domain.db.models_platform import CostReservation, ProjectUsage
from domain.errors import Conflict, InvalidInput, NotFound

log = structlog.get_logger("conveyor.costs")

usage = cast(Table, ProjectUsage.__table__)
reservations = cast(Table, CostReservation.__table__)
MAX_INT64 = 2**63 - 1
MAX_INT32 = 2**31 - 1
MILLION = Decimal(1_000_000)
ZERO = Decimal(0)
#: The scale money is stored at (Numeric(20, 10)): an entry is rounded to it *before* it is
#: stored or added, so a run's total is always exactly the sum of its stored entries.
MONEY_STEP = Decimal("1e-10")
MAX_ENTRY_USD = Decimal("1e9")


class MonthlyLimitReached(Conflict):
    """The project is over its monthly limit."""


def month_of(when: datetime) -> date:
    """The calendar month (UTC) a moment belongs to, as its first day."""
    when = when.astimezone(UTC)
    return date(when.year, when.month, 1)


def as_money(value: Any, *, field: str) -> Decimal:
    """A non-negative exact amount; floats go through their shortest text form."""
    try:
        amount = Decimal(repr(value) if isinstance(value, float) else str(value))
    except (InvalidOperation, ValueError):
        raise InvalidInput(f"{field}: {value!r} is not a number", field=field) from None
    if not amount.is_finite() or amount < 0:
        raise InvalidInput(f"{field}: must be a non-negative amount (got {value!r})", field=field)
    return amount


def as_tokens(value: Any, *, field: str, most: int = MAX_INT64) -> int:
    """A count (tokens, requests) from 0 to `most`; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        limit = "2^63-1" if most == MAX_INT64 else f"{most:,}"
        raise InvalidInput(
            f"{field}: must be a whole number from 0 to {limit} (got {value!r})", field=field
        )
    return value


def as_entry_usd(value: Any, *, field: str = "usd") -> Decimal:
    """One cost entry's amount as it will be stored: exact, rounded half-up to 10 decimal
    places (the column's scale), below a billion USD."""
    # Strings and Decimals (what tasks pass) skip as_money's generality: this runs per call.
    if type(value) is str:
        try:
            amount = Decimal(value)
        except InvalidOperation:
            raise InvalidInput(f"{field}: {value!r} is not a number", field=field) from None
    else:
        amount = value if type(value) is Decimal else as_money(value, field=field)
    try:
        in_range = ZERO <= amount < MAX_ENTRY_USD  # a NaN cannot be compared: it raises
    except InvalidOperation:
        in_range = False
    if not in_range:
        if amount.is_finite() and amount >= MAX_ENTRY_USD:
            raise InvalidInput(
                f"{field}: one entry must be under 1e9 USD (got {value!r})", field=field
            )
        raise InvalidInput(f"{field}: must be a non-negative amount (got {value!r})", field=field)
    return amount.quantize(MONEY_STEP, ROUND_HALF_UP)


def as_label(value: Any, *, field: str, most: int) -> str:
    """A provider or model name: non-empty text of at most `most` characters, no NUL."""
    if type(value) is not str or not value or len(value) > most or "\x00" in value:
        raise InvalidInput(
            f"{field}: must be non-empty text of at most {most} characters (got {value!r})",
            field=field,
        )
    return value


# -- monthly usage ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    cost_usd: Decimal | None
    tokens: int | None


def limits_of(conn: Connection, project: str) -> Limits:
    row = conn.execute(
        select(projects.c.monthly_cost_limit_usd, projects.c.monthly_token_limit).where(
            projects.c.name == project
        )
    ).first()
    if row is None:
        raise NotFound(f"no project named {project!r}", project=project)
    return Limits(row[0], row[1])


def _ensure_usage(conn: Connection, project: str, month: date) -> None:
    conn.execute(
        sql.insert(conn, usage)
        .values(
            project=project,
            month=month,
            cost_usd=ZERO,
            tokens=0,
            reserved_usd=ZERO,
            reserved_tokens=0,
        )
        .on_conflict_do_nothing(index_elements=["project", "month"])
    )


def usage_of(conn: Connection, project: str, month: date) -> Any:
    return (
        conn.execute(select(usage).where(usage.c.project == project, usage.c.month == month))
        .mappings()
        .one()
    )


def add_usage(
    conn: Connection,
    project: str,
    month: date,
    *,
    usd: Decimal = ZERO,
    tokens: int = 0,
    reserve_usd: Decimal = ZERO,
    reserve_tokens: int = 0,
    limits: Limits | None = None,
) -> Any:
    """Add spend and/or reservation to the project's month. With `limits`, only if the result
    stays within them (one conditional UPDATE); returns the new row, or None when refused."""
    _ensure_usage(conn, project, month)
    key = and_(usage.c.project == project, usage.c.month == month)
    if not capabilities(conn).numeric_money:
        # Money is text on SQLite; add in Python (writers are serialised there).
        row = usage_of(conn, project, month)
        new = {
            "cost_usd": Decimal(row["cost_usd"]) + usd,
            "tokens": row["tokens"] + tokens,
            "reserved_usd": Decimal(row["reserved_usd"]) + reserve_usd,
            "reserved_tokens": row["reserved_tokens"] + reserve_tokens,
        }
        if limits is not None and not _within(new, limits):
            return None
        conn.execute(update(usage).where(key).values(new))
        return usage_of(conn, project, month)
    condition = [key]
    if limits is not None and limits.cost_usd is not None:
        condition.append(
            usage.c.cost_usd + usage.c.reserved_usd + usd + reserve_usd <= limits.cost_usd
        )
    if limits is not None and limits.tokens is not None:
        condition.append(
            usage.c.tokens + usage.c.reserved_tokens + tokens + reserve_tokens <= limits.tokens
        )
    return (
        conn.execute(
            update(usage)
            .where(*condition)
            .values(
                cost_usd=usage.c.cost_usd + usd,
                tokens=usage.c.tokens + tokens,
                reserved_usd=usage.c.reserved_usd + reserve_usd,
                reserved_tokens=usage.c.reserved_tokens + reserve_tokens,
            )
            .returning(*usage.c)
        )
        .mappings()
        .first()
    )


def _within(row: dict[str, Any], limits: Limits) -> bool:
    if limits.cost_usd is not None and row["cost_usd"] + row["reserved_usd"] > limits.cost_usd:
        return False
    return not (
        limits.tokens is not None and row["tokens"] + row["reserved_tokens"] > limits.tokens
    )


def with_month_usage(month: Any) -> Join:
    """Projects joined to their usage row of `month` (NULLs where nothing was spent yet)."""
    return projects.outerjoin(
        usage, and_(usage.c.project == projects.c.name, usage.c.month == month)
    )


#: A project's monthly limits beside what it spent that month (select from with_month_usage).
LIMITS_AND_USAGE = (
    projects.c.name,
    projects.c.monthly_cost_limit_usd,
    projects.c.monthly_token_limit,
    usage.c.cost_usd,
    usage.c.tokens,
)

# Built once: every enqueue runs it, and building it cost more CPU than running it.
_LIMITED = (
    select(*LIMITS_AND_USAGE)
    .select_from(with_month_usage(bindparam("month")))
    .where(
        projects.c.name.in_(bindparam("names", expanding=True)),
        (projects.c.monthly_cost_limit_usd.is_not(None))
        | (projects.c.monthly_token_limit.is_not(None)),
    )
)


def check_can_enqueue(conn: Connection, project_names: set[str], now: datetime) -> None:
    """Refuse new work for a project already at its monthly limit (one query per batch)."""
    month = month_of(now)
    rows = conn.execute(_LIMITED, {"names": sorted(project_names), "month": month}).all()
    for name, cost_limit, token_limit, spent_raw, tokens_raw in rows:
        spent, tokens = Decimal(spent_raw or 0), int(tokens_raw or 0)
        if cost_limit is not None and spent >= Decimal(cost_limit):
            raise MonthlyLimitReached(
                f"project {name!r} has spent {spent} USD of its {cost_limit} USD monthly limit "
                f"in {month:%Y-%m}; new runs are refused until the limit is raised or the "
                "month ends",
                project=name,
            )
        if token_limit is not None and tokens >= int(token_limit):
            raise MonthlyLimitReached(
                f"project {name!r} has used {tokens} of its {token_limit} monthly tokens in "
                f"{month:%Y-%m}; new runs are refused",
                project=name,
            )


# -- recording and reserving from a running task ----------------------------------------------
def add_to_run(
    conn: Connection,
    run_id: uuid.UUID,
    attempt: int,
    *,
    usd: Decimal,
    tokens_in: int,
    tokens_out: int,
    requests: int,
    entries: int,
) -> int | None:
    """Add `entries` buffered entries' sums to the run's totals, in the caller's transaction
    (the one that writes the entries). Returns the seq of the last of them (they take the
    `entries` numbers up to it), or None when another attempt has claimed the run: fenced by
    attempt only.

    Unlike the per-call path it does not also require `running`: the writer may land an
    attempt's last entries after that attempt wrote its final state (a database outage at the
    end), and spend that really happened belongs on the run.
    """
    row = run_spend.add_spend(
        conn,
        and_(runs.c.id == run_id, runs.c.attempt == attempt),
        usd=usd,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        requests=requests,
        entries=entries,
    )
    return None if row is None else int(row[-1])


def record(
    conn: Connection,
    run_id: uuid.UUID,
    attempt: int,
    project: str,
    entry: dict[str, Any],
    *,
    reservation_id: int | None = None,
    spawned: bool = False,
) -> tuple[run_spend.Totals, str | None]:
    """The cost entry, the run's totals and the project's month, in the caller's transaction.
    Returns the run's totals and, when the project is now over a limit (or, for a `spawned`
    run, an ancestor over its budget, which the run's spend also counts toward), why.

    Spent inside `reserve()` (`reservation_id`), the entry settles that much of the reservation
    in the same statement that adds the spend: the month never counts the same money as both
    spent and reserved, so a concurrent reservation is judged on what is really committed.
    """
    totals = run_spend.record_cost(conn, run_id, attempt, entry=entry)
    ancestor_over = (
        run_spend.add_to_ancestors(conn, run_id, Decimal(entry["cost_usd"])) if spawned else None
    )
    month = month_of(entry["ts"])
    usd, tokens = Decimal(entry["cost_usd"]), entry["tokens_in"] + entry["tokens_out"]
    settled_usd, settled_tokens = (
        _settle(conn, reservation_id, usd, tokens) if reservation_id is not None else (ZERO, 0)
    )
    row = add_usage(
        conn,
        project,
        month,
        usd=usd,
        tokens=tokens,
        reserve_usd=-settled_usd,
        reserve_tokens=-settled_tokens,
    )
    limits = limits_of(conn, project)
    over = None
    if limits.cost_usd is not None and Decimal(row["cost_usd"]) > limits.cost_usd:
        over = (
            f"project {project!r} monthly cost limit {limits.cost_usd} USD exceeded by "
            f"{Decimal(row['cost_usd']) - limits.cost_usd} USD"
        )
    elif limits.tokens is not None and row["tokens"] > limits.tokens:
        over = (
            f"project {project!r} monthly token limit {limits.tokens} exceeded by "
            f"{row['tokens'] - limits.tokens} tokens"
        )
    return totals, over or ancestor_over


def _settle(
    conn: Connection, reservation_id: int, usd: Decimal, tokens: int
) -> tuple[Decimal, int]:
    """Take up to (usd, tokens) off an open reservation; returns how much was taken."""
    held = conn.execute(
        select(reservations.c.usd, reservations.c.tokens)
        .where(reservations.c.id == reservation_id, reservations.c.settled_at.is_(None))
        .with_for_update()
    ).first()
    if held is None:
        return ZERO, 0
    take_usd, take_tokens = min(Decimal(held.usd), usd), min(int(held.tokens), tokens)
    conn.execute(
        update(reservations)
        .where(reservations.c.id == reservation_id)
        .values(usd=Decimal(held.usd) - take_usd, tokens=int(held.tokens) - take_tokens)
    )
    return take_usd, take_tokens
