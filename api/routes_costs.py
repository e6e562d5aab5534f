"""/api/v1/costs: the cost ledger summed per provider, model, task name, day or project, exactly
as `conveyor costs` reports it (decimal USD as strings, so nothing is rounded on the way)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.auth import Reader
from api.state import State
from domain.costs.ledger import ZERO
from domain.costs.reports import report

router = APIRouter(prefix="/api/v1/costs", tags=["costs"])


class CostsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: Literal["provider", "model", "name", "day", "project"] = "model"
    project: str | None = Field(None, min_length=1, max_length=100)
    since: AwareDatetime | None = None


@router.get("")
def costs(state: State, _: Reader, query: Annotated[CostsQuery, Query()]) -> dict[str, Any]:
    """One item per group with its USD, tokens, requests and number of entries, and the total;
    the items sum to the total exactly."""
    rows = report(state.reader(), project=query.project, since=query.since, by=query.by)
    total = sum((r["cost_usd"] for r in rows), ZERO)
    return {
        "by": query.by,
        "items": [{**r, "cost_usd": str(r["cost_usd"])} for r in rows],
        "total_usd": str(total),
    }
