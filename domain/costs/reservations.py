"""Reservations: headroom a run takes from its project's month before a call, given back
when unspent (`ledger.record` settles what was spent)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from domain.costs.ledger import ZERO, add_usage, limits_of, month_of, reservations, usage_of
from domain.db.models import runs
from domain.errors import BudgetExceeded


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
            current = usage_of(conn, project, month)
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
