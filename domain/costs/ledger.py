"""The cost ledger beyond one run: prices, a project's monthly usage, reservations, reports.

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

import tomllib
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

import structlog
from sqlalchemy import Connection, Engine, Join, Table, and_, bindparam, select, update

from domain.db.models import projects, runs
from domain.db.models_platform import CostReservation, ProjectUsage
from domain.errors import BudgetExceeded, ConfigurationError, Conflict, InvalidInput, NotFound
from domain.runs import store as runstore
from domain.runs.repository import dialect_insert

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


# -- prices -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prices:
    """USD per million input/output tokens per (provider, model), from prices.toml:

    [openai."gpt-4o-mini"]
    input_per_million = "0.15"
    output_per_million = "0.60"
    """

    table: dict[tuple[str, str], tuple[Decimal, Decimal]]

    @classmethod
    def load(cls, path: Path | None) -> Prices:
        if path is None or not path.exists():
            return cls({})
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
        table: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
        for provider, models in raw.items():
            for model, entry in models.items():
                where = f"{path}: [{provider}.{model}]"
                currency = str(entry.get("currency", "USD"))
                if currency.upper() != "USD":
                    raise ConfigurationError(f"{where}: currency {currency!r}; prices are in USD")
                try:
                    table[(provider, model)] = (
                        as_money(entry["input_per_million"], field="input_per_million"),
                        as_money(entry["output_per_million"], field="output_per_million"),
                    )
                except KeyError as missing:
                    raise ConfigurationError(f"{where}: missing {missing}") from None
                except InvalidInput as exc:
                    raise ConfigurationError(f"{where}: {exc}") from None
        return cls(table)

    def cost(self, provider: str, model: str, tokens_in: int, tokens_out: int) -> Decimal | None:
        price = self.table.get((provider, model))
        if price is None:
            return None
        return (price[0] * tokens_in + price[1] * tokens_out) / MILLION


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
        dialect_insert(conn, usage)
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


def _usage(conn: Connection, project: str, month: date) -> Any:
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
    if conn.dialect.name == "sqlite":
        # Money is text on SQLite; add in Python (writers are serialised there).
        row = _usage(conn, project, month)
        new = {
            "cost_usd": Decimal(row["cost_usd"]) + usd,
            "tokens": row["tokens"] + tokens,
            "reserved_usd": Decimal(row["reserved_usd"]) + reserve_usd,
            "reserved_tokens": row["reserved_tokens"] + reserve_tokens,
        }
        if limits is not None and not _within(new, limits):
            return None
        conn.execute(update(usage).where(key).values(new))
        return _usage(conn, project, month)
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
    row = runstore.add_spend(
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
) -> tuple[runstore.Totals, str | None]:
    """The cost entry, the run's totals and the project's month, in the caller's transaction.
    Returns the run's totals and, when the project is now over a limit, why.

    Spent inside `reserve()` (`reservation_id`), the entry settles that much of the reservation
    in the same statement that adds the spend: the month never counts the same money as both
    spent and reserved, so a concurrent reservation is judged on what is really committed.
    """
    totals = runstore.record_cost(conn, run_id, attempt, entry=entry)
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
    return totals, over


def reserve(
    engine: Engine, run_id: uuid.UUID, project: str, *, usd: Decimal, tokens: int, now: datetime
) -> int:
    """Reserve headroom before an expensive call; BudgetExceeded (which stops the run) when the
    run's budget or the project's monthly limit does not have it."""
    month = month_of(now)
    with engine.begin() as conn:
        run = conn.execute(
            select(runs.c.cost_usd, runs.c.budget_usd).where(runs.c.id == run_id)
        ).one()
        if run.budget_usd is not None:
            held = sum(
                (
                    Decimal(v)
                    for v in conn.execute(
                        select(reservations.c.usd).where(
                            reservations.c.run_id == run_id, reservations.c.settled_at.is_(None)
                        )
                    ).scalars()
                ),
                ZERO,
            )
            remaining = Decimal(run.budget_usd) - Decimal(run.cost_usd) - held
            if usd > remaining:
                raise BudgetExceeded(
                    f"reserving {usd} USD exceeds the run's remaining budget of {remaining} USD "
                    f"(budget_usd {run.budget_usd})"
                )
        limits = limits_of(conn, project)
        row = add_usage(conn, project, month, reserve_usd=usd, reserve_tokens=tokens, limits=limits)
        if row is None:
            current = _usage(conn, project, month)
            raise BudgetExceeded(
                f"reserving {usd} USD / {tokens} tokens would exceed project {project!r}'s "
                f"monthly limit (cost {limits.cost_usd}, tokens {limits.tokens}; spent "
                f"{current['cost_usd']} USD and {current['tokens']} tokens, reserved "
                f"{current['reserved_usd']} USD and {current['reserved_tokens']} tokens)"
            )
        inserted = conn.execute(
            reservations.insert()
            .values(
                run_id=run_id, project=project, month=month, usd=usd, tokens=tokens, created_at=now
            )
            .returning(reservations.c.id)
        ).scalar_one()
    return int(inserted)


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


def release(engine: Engine, reservation_id: int, *, now: datetime) -> None:
    """Give back what is left of the headroom (`record` settled what was spent inside it)."""
    with engine.begin() as conn:
        _give_back(conn, reservations.c.id == reservation_id, now=now)


def release_held(conn: Connection, run_ids: list[uuid.UUID], *, now: datetime) -> None:
    """Give back the open reservations of runs whose attempt is gone (its worker was killed or
    its code ended inside `ctx.reserve()`, so the block never released them): in the
    transaction that takes the runs back, else the headroom would stay held for the month."""
    if run_ids:
        _give_back(conn, reservations.c.run_id.in_(run_ids), now=now)


def _give_back(conn: Connection, which: Any, *, now: datetime) -> None:
    rows = conn.execute(
        update(reservations)
        .where(which, reservations.c.settled_at.is_(None))
        .values(settled_at=now)
        .returning(
            reservations.c.project,
            reservations.c.month,
            reservations.c.usd,
            reservations.c.tokens,
        )
    ).all()
    for row in rows:
        add_usage(
            conn,
            row.project,
            row.month,
            reserve_usd=-Decimal(row.usd),
            reserve_tokens=-int(row.tokens),
        )
