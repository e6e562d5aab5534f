"""A run's spend: cost entries and the totals they add to the run row, fenced by attempt."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Row, select, update

from domain.db.capabilities import capabilities
from domain.db.models import runs
from domain.errors import LeaseLost
from domain.runs import fence


@dataclass(frozen=True, slots=True)
class Totals:
    """A run's spend after a cost entry, with its limits, to decide whether it must stop."""

    cost_usd: Any
    tokens_in: int
    tokens_out: int
    requests_made: int
    budget_usd: Any
    max_requests: int | None


#: What the per-call path reads back after adding an entry, to decide whether the run stops.
_TOTALS = (
    runs.c.cost_usd,
    runs.c.tokens_in,
    runs.c.tokens_out,
    runs.c.requests_made,
    runs.c.budget_usd,
    runs.c.max_requests,
)


def add_spend(
    conn: Connection,
    owned: Any,
    *,
    usd: Decimal,
    tokens_in: int,
    tokens_out: int,
    requests: int,
    entries: int,
    returning: Sequence[Any] = (),
) -> Row[Any] | None:
    """Add spend and `entries` cost entries to the run `owned` selects, in the caller's
    transaction. Returns the `returning` columns followed by the run's cost_entry_count (the
    seq of the last entry added; the `entries` before it are theirs too), or None when no run
    matched (its attempt no longer owns it)."""
    new_cost: Any
    if not capabilities(conn).numeric_money:
        # Money is text on SQLite (exact); add in Python. Writers are serialised there anyway.
        current = conn.execute(select(runs.c.cost_usd).where(owned)).first()
        if current is None:
            return None
        new_cost = Decimal(current[0]) + usd
    else:
        new_cost = runs.c.cost_usd + usd
    return conn.execute(
        update(runs)
        .where(owned)
        .values(
            cost_usd=new_cost,
            tokens_in=runs.c.tokens_in + tokens_in,
            tokens_out=runs.c.tokens_out + tokens_out,
            requests_made=runs.c.requests_made + requests,
            cost_entry_count=runs.c.cost_entry_count + entries,
        )
        .returning(*returning, runs.c.cost_entry_count)
    ).first()


def record_cost(
    conn: Connection, run_id: uuid.UUID, attempt: int, *, entry: dict[str, Any]
) -> Totals:
    """Add a cost entry and the run's totals in one transaction, fenced by attempt."""
    from domain.db.models import cost_entries

    row = add_spend(
        conn,
        fence.owned(run_id, attempt),
        usd=Decimal(entry["cost_usd"]),
        tokens_in=entry["tokens_in"],
        tokens_out=entry["tokens_out"],
        requests=entry["requests"],
        entries=1,
        returning=_TOTALS,
    )
    if row is None:
        raise LeaseLost(f"run {run_id} attempt {attempt} no longer owns its lease")
    conn.execute(cost_entries.insert().values(run_id=run_id, seq=row[-1], **entry))
    return Totals(*tuple(row)[:-1])


def add_to_ancestors(conn: Connection, run_id: uuid.UUID, usd: Decimal) -> str | None:
    """A spawned run's spend counts toward its parent's budget, and the parent's toward its
    own: add `usd` to each ancestor's cost_usd, nearest first, in the caller's transaction.
    Why the run must stop (an ancestor is now over its budget_usd), or None."""
    over = None
    child = run_id
    for _ in range(MAX_DEPTH):
        parent_id = conn.execute(
            select(runs.c.parent_run_id).where(runs.c.id == child, runs.c.triggered_by == "spawn")
        ).scalar()
        if parent_id is None:
            return over
        row = add_spend(
            conn,
            runs.c.id == parent_id,
            usd=usd,
            tokens_in=0,
            tokens_out=0,
            requests=0,
            entries=0,
            returning=(runs.c.cost_usd, runs.c.budget_usd),
        )
        if row is None:
            return over
        values = tuple(row)
        cost, budget = Decimal(values[0]), values[1]
        if over is None and budget is not None and cost > Decimal(budget):
            limit = Decimal(budget)
            over = (
                f"parent run {parent_id} budget_usd {_plain(limit)} exceeded by "
                f"{_plain(cost - limit)} (its children's spend counts toward it)"
            )
        child = parent_id
    return over


#: How far up a chain of spawned runs spend is counted (a guard against a cycle of parents).
MAX_DEPTH = 32


def _plain(amount: Decimal) -> str:
    """1.0000000000 and 1.00 alike as 1; 0.2000000000 as 0.2."""
    return f"{amount.normalize():f}"
