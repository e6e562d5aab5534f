"""/api/v1/limits: rate limits (requests and tokens per minute, what the last minute used and
what is left, runs waiting) and the concurrency keys in use; admins define and remove rate
limits. The same as `conveyor limits`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Admin, Reader, client_ip
from api.state import State
from domain.clock import utc_now
from domain.flow import manage, rates
from domain.flow.rates import RateLimit

router = APIRouter(prefix="/api/v1/limits", tags=["limits"])

LimitName = Annotated[
    str, Path(min_length=1, max_length=rates.MAX_NAME, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]*$")
]


class RateLimitBody(BaseModel):
    """Either or both; a missing one is not limited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1, le=rates.MAX_REQUESTS_PER_MINUTE)
    tokens_per_minute: int | None = Field(None, ge=1, le=rates.MAX_TOKENS_PER_MINUTE)


@router.get("")
def list_limits(state: State, _: Reader) -> dict[str, Any]:
    """`rate_limits`: each with its limits, `requests_used`/`tokens_used` in the last minute,
    what is left and how many runs wait for it. `concurrency`: each key held or waited for,
    with its max, running and waiting runs (the busiest 500)."""
    return manage.overview(state.reader(), now=utc_now())


@router.put("/{name}")
def define_limit(
    state: State, who: Admin, request: Request, name: LimitName, body: RateLimitBody
) -> dict[str, Any]:
    """Create or change the rate limit `name`; what its window holds stays counted."""
    limit = RateLimit(name, body.requests_per_minute, body.tokens_per_minute)
    return manage.define(
        state.uow(), limit, defined_in="api", actor=who.name, now=utc_now(), ip=client_ip(request)
    )


@router.delete("/{name}", status_code=204)
def remove_limit(state: State, who: Admin, request: Request, name: LimitName) -> Response:
    """Delete the rate limit and its counts: runs naming it start unlimited, with a warning."""
    manage.remove(state.uow(), name, actor=who.name, ip=client_ip(request))
    return Response(status_code=204)
