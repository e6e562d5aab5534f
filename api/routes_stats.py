"""/api/v1/stats: runs per project, name and hour or day (counts, durations, cost, tokens)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.auth import Reader
from api.state import State
from domain.housekeeping.stats import run_stats_for

router = APIRouter(prefix="/api/v1/stats", tags=["stats"])


class StatsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period: Literal["hour", "day"] = "day"
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    project: str | None = Field(None, min_length=1, max_length=100)
    name: str | None = Field(None, min_length=1, max_length=200)
    limit: int = Field(1000, ge=1, le=10_000)


@router.get("")
def stats(state: State, _: Reader, query: Annotated[StatsQuery, Query()]) -> dict[str, Any]:
    """One item per period, project and name in [since, until) (default: the last 7 days, or
    24 hours by hour). `source` says who answered: the scheduler's rollups (`rollups`), the
    runs themselves (`runs`: periods the rollups have not reached yet), or both (`mixed`).
    Runs count in the period they ended in."""
    return run_stats_for(state.reader(), **query.model_dump()).to_dict()
