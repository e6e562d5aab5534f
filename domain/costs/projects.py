"""Projects: every run belongs to one; each may carry monthly cost and token limits, and says
what a run does when it is claimed at one (`on_limit`: `stop` ends it, `hold` keeps it pending)."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from domain import storable
from domain.costs.admission import ON_LIMIT
from domain.costs.ledger import LIMITS_AND_USAGE, as_money, month_of, usage, with_month_usage
from domain.db.models import projects
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, InvalidInput, NotFound
from domain.runs.requests import NAME_PATTERN

UNSET: Any = object()


def _limit_usd(value: Any) -> Decimal | None:
    if value is None:
        return None
    amount = as_money(value, field="monthly_cost_usd")
    if amount >= storable.MAX_USD:
        raise InvalidInput(
            f"monthly_cost_usd: must be below {storable.MAX_USD:,.0f} USD (got {value!r})",
            field="monthly_cost_usd",
        )
    if amount <= 0:
        raise InvalidInput(
            "monthly_cost_usd: a limit of zero would refuse all work; pause the project's "
            "schedules instead, or clear the limit",
            field="monthly_cost_usd",
        )
    return amount


def _limit_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**63:
        raise InvalidInput(
            f"monthly_tokens: a positive whole number below 2^63 (got {value!r})",
            field="monthly_tokens",
        )
    return value


def _on_limit(value: Any) -> str:
    if value not in ON_LIMIT:
        raise InvalidInput(
            f"on_limit: must be one of {', '.join(ON_LIMIT)} (got {value!r})", field="on_limit"
        )
    return str(value)


def _weight(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        raise InvalidInput(
            f"weight: a whole number from 1 to {MAX_WEIGHT} (got {value!r})", field="weight"
        )
    return value


#: A project's share of a busy queue's starts is its weight over the others' (fair share).
MAX_WEIGHT = 1000


def add_project(
    uow: UnitOfWork,
    name: str,
    *,
    monthly_cost_usd: Any = None,
    monthly_tokens: Any = None,
    on_limit: Any = "stop",
    weight: Any = 1,
    now: datetime,
) -> dict[str, Any]:
    if not re.match(NAME_PATTERN, name) or len(name) > 100:
        raise InvalidInput(
            f"name: {name!r}: use letters, digits, _ . : - (at most 100)", field="name"
        )
    values = {
        "name": name,
        "monthly_cost_limit_usd": _limit_usd(monthly_cost_usd),
        "monthly_token_limit": _limit_tokens(monthly_tokens),
        "on_limit": _on_limit(on_limit),
        "weight": _weight(weight),
        "created_at": now,
    }
    try:
        with uow:
            uow.conn.execute(projects.insert().values(values))
            uow.commit()
    except IntegrityError:
        raise Conflict(f"name: a project named {name!r} already exists", field="name") from None
    return show_project(uow, name, now=now)


def set_limits(
    uow: UnitOfWork,
    name: str,
    *,
    monthly_cost_usd: Any = UNSET,
    monthly_tokens: Any = UNSET,
    on_limit: Any = UNSET,
    weight: Any = UNSET,
    now: datetime,
) -> dict[str, Any]:
    """Change limits, or what a run does at one (`on_limit`: stop or hold), or the project's
    weight in a busy queue; pass None to clear a limit, leave it out to keep it."""
    values: dict[str, Any] = {}
    if monthly_cost_usd is not UNSET:
        values["monthly_cost_limit_usd"] = _limit_usd(monthly_cost_usd)
    if monthly_tokens is not UNSET:
        values["monthly_token_limit"] = _limit_tokens(monthly_tokens)
    if on_limit is not UNSET:
        values["on_limit"] = _on_limit(on_limit)
    if weight is not UNSET:
        values["weight"] = _weight(weight)
    if not values:
        raise InvalidInput(
            "give --monthly-cost-usd, --monthly-tokens, --on-limit and/or --weight",
            field="limits",
        )
    with uow:
        if not uow.conn.execute(
            update(projects).where(projects.c.name == name).values(values)
        ).rowcount:
            raise NotFound(f"no project named {name!r}", name=name)
        uow.commit()
    return show_project(uow, name, now=now)


def list_projects(uow: UnitOfWork, *, now: datetime) -> list[dict[str, Any]]:
    month = month_of(now)
    query = (
        select(*LIMITS_AND_USAGE, usage.c.reserved_usd, projects.c.on_limit, projects.c.weight)
        .select_from(with_month_usage(month))
        .order_by(projects.c.name)
    )
    with uow:
        rows = uow.conn.execute(query).mappings().all()
    return [
        {
            "name": r["name"],
            "month": f"{month:%Y-%m}",
            "monthly_cost_limit_usd": _text(r["monthly_cost_limit_usd"]),
            "monthly_token_limit": r["monthly_token_limit"],
            "on_limit": r["on_limit"],
            "weight": r["weight"],
            "spent_usd": _text(Decimal(r["cost_usd"] or 0)),
            "tokens": int(r["tokens"] or 0),
            "reserved_usd": _text(Decimal(r["reserved_usd"] or 0)),
        }
        for r in rows
    ]


def show_project(uow: UnitOfWork, name: str, *, now: datetime) -> dict[str, Any]:
    for project in list_projects(uow, now=now):
        if project["name"] == name:
            return project
    raise NotFound(f"no project named {name!r}", name=name)


def _text(value: Decimal | None) -> str | None:
    return None if value is None else format(Decimal(value).normalize(), "f")
