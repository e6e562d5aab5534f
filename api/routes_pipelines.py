"""/api/v1/pipelines: the discovered pipelines with their counters, and triggering a run."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.auth import Reader, Writer, client_ip
from api.state import State
from domain.pipelines.reads import TableCatalog, get_pipeline, list_pipelines, pipeline_detail
from domain.runs import enqueue
from domain.runs.requests import (
    Attempts,
    Count,
    Delay,
    Minutes,
    Priority,
    Seconds,
    Usd,
    build_request,
)

router = APIRouter(prefix="/api/v1/pipelines", tags=["pipelines"])

Name = Annotated[str, Path(min_length=1, max_length=200)]


class TriggerPipeline(BaseModel):
    """A run of the pipeline; its params are checked against the pipeline's own."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)
    project: str | None = Field(None, min_length=1, max_length=100)
    queue: str | None = Field(None, min_length=1, max_length=100)
    priority: Priority | None = None
    delay_s: Delay | None = None
    not_before: AwareDatetime | None = None
    max_attempts: Attempts | None = None
    timeout_s: Seconds | None = None
    budget_usd: Usd | None = None
    max_requests: Count | None = None
    max_minutes: Minutes | None = None
    callback_url: str | None = Field(None, max_length=2000)


@router.get("")
def list_all(state: State, _: Reader) -> dict[str, Any]:
    """Every discovered pipeline: whether it can run, its environment, its run counters."""
    return {"items": [view.to_dict() for view in list_pipelines(state.reader())]}


@router.get("/{name}")
def detail(state: State, _: Reader, name: Name) -> dict[str, Any]:
    """One pipeline with its configuration, counters, last run and last error."""
    return pipeline_detail(state.reader(), name)


@router.post(
    "/{name}/trigger",
    status_code=201,
    responses={200: {"description": "Existing run (same idempotency key)"}},
)
def trigger(
    state: State,
    who: Writer,
    request: Request,
    name: Name,
    body: Annotated[TriggerPipeline | None, Body()] = None,
) -> JSONResponse:
    """Run the pipeline: 201 with the new run; 200 with the run an idempotency key made
    before; 404 for an unknown pipeline, 409 for one whose configuration does not validate."""
    get_pipeline(state.uow(), name)
    fields = (body or TriggerPipeline()).model_dump(exclude_none=True)
    fields.setdefault("project", state.settings.default_project)
    req = build_request(
        name=name, kind="pipeline", triggered_by="api", trigger_ref=who.name, **fields
    )
    result = enqueue.create_run(
        state.uow(),
        req,
        actor=who.name,
        ip=client_ip(request),
        action="pipeline.trigger",
        publisher=state.publisher,
        catalog=TableCatalog(state.engine, state.catalog),
    )
    run = result.run
    return JSONResponse(
        run.to_dict(),
        status_code=201 if result.created else 200,
        headers={"Location": f"/api/v1/runs/{run.id}"},
    )
