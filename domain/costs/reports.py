"""Cost reports: the ledger's entries summed per provider, model, task name, day or project
(`conveyor costs`). Read only; what writes the ledger and enforces limits is
domain/costs/ledger.py."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from domain.costs.ledger import ZERO
from domain.db.models import cost_entries, runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput

GROUPS = ("provider", "model", "name", "day", "project")


def report(
    uow: UnitOfWork,
    *,
    project: str | None = None,
    since: datetime | None = None,
    by: str = "model",
) -> list[dict[str, Any]]:
    """Spend grouped by provider, model, task name, day or project, summed exactly."""
    if by not in GROUPS:
        raise InvalidInput(f"by: expected one of {', '.join(GROUPS)} (got {by!r})", field="by")
    query = select(
        cost_entries.c.provider,
        cost_entries.c.model,
        cost_entries.c.project,
        cost_entries.c.ts,
        cost_entries.c.tokens_in,
        cost_entries.c.tokens_out,
        cost_entries.c.requests,
        cost_entries.c.cost_usd,
        runs.c.name,
    ).join(runs, runs.c.id == cost_entries.c.run_id)
    if project:
        query = query.where(cost_entries.c.project == project)
    if since:
        query = query.where(cost_entries.c.ts >= since)
    groups: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"cost_usd": ZERO, "tokens_in": 0, "tokens_out": 0, "requests": 0, "entries": 0}
    )
    with uow:
        conn = uow.conn
        for row in conn.execute(query).mappings():
            key = f"{row['ts']:%Y-%m-%d}" if by == "day" else str(row[by])
            group = groups[key]
            group["cost_usd"] += Decimal(row["cost_usd"])
            group["tokens_in"] += row["tokens_in"]
            group["tokens_out"] += row["tokens_out"]
            group["requests"] += row["requests"]
            group["entries"] += 1
    return [{by: key, **values} for key, values in sorted(groups.items())]
