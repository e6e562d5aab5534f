"""/api/v1/runs: list, detail, logs, metrics, costs, artifacts (and their files); create,
cancel, retry."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.auth import Reader, Writer, client_ip
from api.downloads import attachment
from api.json_body import JSONBody
from api.state import State
from domain.clock import utc_now
from domain.errors import InvalidInput
from domain.runs import artifacts, control, enqueue, signals
from domain.runs import reads as queries
from domain.runs.repository import RunFilter
from domain.runs.requests import (
    Attempts,
    Count,
    Delay,
    Minutes,
    Priority,
    Seconds,
    Slots,
    Usd,
    build_request,
)
from domain.runs.states import Status
from domain.tasks.catalog import permissive

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])

RunId = uuid.UUID


class RunQuery(BaseModel):
    """Filters for the runs list; unknown parameters are refused, so a typo never widens it."""

    model_config = ConfigDict(extra="forbid")

    status: list[Status] = Field(default_factory=list, max_length=len(Status))
    name: str | None = Field(None, min_length=1, max_length=200)
    project: str | None = Field(None, min_length=1, max_length=100)
    created_after: AwareDatetime | None = None
    created_before: AwareDatetime | None = None
    error: str | None = Field(
        None, min_length=1, max_length=200, description="Text the run's error contains (any case)"
    )
    limit: int = Field(50, ge=1, le=1000)
    cursor: str | None = Field(None, min_length=1, max_length=200)


class CreateRun(BaseModel):
    """A run to create. Checked again, with the task's own params model, by the service."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
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
    concurrency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="At most concurrency_max runs with this key run at once",
    )
    concurrency_max: Slots | None = None
    kind: Literal["task", "pipeline"] = "task"
    callback_url: str | None = Field(None, max_length=2000)
    allow_unknown: bool = Field(
        False, description="Accept a task no worker has published yet (checked when it runs)"
    )


class CancelRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500)


@router.get("", response_class=JSONBody)
def list_runs(state: State, _: Reader, query: Annotated[RunQuery, Query()]) -> JSONBody:
    """Runs newest first; pass `next_cursor` back as `cursor` for the next page."""
    filters = RunFilter(
        status=[s.value for s in query.status],
        name=query.name,
        project=query.project,
        created_after=query.created_after,
        created_before=query.created_before,
        error=query.error,
    )
    page = state.reads.page(filters, limit=query.limit, cursor=query.cursor)
    # A response, not a dict: FastAPI would validate the whole page against dict[str, Any]
    # before encoding it, a visible share of the API's CPU under the read benchmark; the
    # views go to orjson as they are (api/json_body.py).
    items = [queries.masked(view) for view in page.items]
    return JSONBody({"items": items, "next_cursor": page.next_cursor})


@router.post("", status_code=201, responses={200: {"description": "Existing run (same key)"}})
def create_run(
    state: State,
    who: Writer,
    request: Request,
    body: CreateRun,
    idempotency_header: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
    ] = None,
) -> JSONResponse:
    """Create a run: 201 when new; 200 with the same run when its idempotency key was used."""
    fields = body.model_dump(exclude_none=True)
    allow_unknown = fields.pop("allow_unknown", False)
    header = idempotency_header
    if header is not None and fields.setdefault("idempotency_key", header) != header:
        raise InvalidInput(
            "idempotency_key: the body and the Idempotency-Key header differ",
            field="idempotency_key",
        )
    fields.setdefault("project", state.settings.default_project)
    req = build_request(**fields, triggered_by="api", trigger_ref=who.name)
    catalog = permissive(state.catalog) if allow_unknown and state.catalog else state.catalog
    result = enqueue.create_run(
        state.uow(),
        req,
        actor=who.name,
        ip=client_ip(request),
        publisher=state.publisher,
        catalog=catalog,
    )
    run = result.run
    warnings = state.delivery.warnings(run, utc_now()) if state.delivery is not None else []
    # JSONBody encodes any run the checks let through, so a committed run is never answered
    # with a 500 (which a client would retry into a duplicate).
    return JSONBody(
        {**queries.masked(run).to_dict(), "warnings": warnings},
        status_code=201 if result.created else 200,
        headers={"Location": f"/api/v1/runs/{run.id}"},
    )


@router.get("/{run_id}", response_class=JSONBody)
def get_run(state: State, _: Reader, run_id: RunId) -> JSONBody:
    """The run with its steps, totals (tokens, requests, log lines) and cost per model."""
    return JSONBody(state.reads.detail(run_id).masked().to_dict())


@router.get("/{run_id}/logs", response_class=JSONBody)
def get_logs(
    state: State,
    _: Reader,
    run_id: RunId,
    after_seq: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> JSONBody:
    """Log lines after `after_seq`; pass `next_after_seq` back to read on."""
    lines = control.run_logs(state.reader(), run_id, after_seq=after_seq, limit=limit)
    return JSONBody({"items": lines, "next_after_seq": lines[-1].seq if lines else after_seq})


@router.get("/{run_id}/metrics")
def get_metrics(
    state: State,
    _: Reader,
    run_id: RunId,
    name: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    """The run's metric samples (custom metrics, cpu_percent, rss_bytes) in time order."""
    points = queries.run_metric_points(state.reader(), run_id, name=name, limit=limit)
    return {"items": [point.to_dict() for point in points]}


@router.get("/{run_id}/costs")
def get_costs(state: State, _: Reader, run_id: RunId) -> dict[str, Any]:
    """Every cost entry of the run and their exact total."""
    entries, total = queries.run_costs(state.reader(), run_id)
    return {"items": [entry.to_dict() for entry in entries], "total": total}


@router.get("/{run_id}/artifacts")
def get_artifacts(state: State, _: Reader, run_id: RunId) -> dict[str, Any]:
    """The run's artifacts by name: where the worker wrote each, its size and sha256."""
    return {"items": [a.to_dict() for a in artifacts.run_artifact_list(state.reader(), run_id)]}


@router.get(
    "/{run_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        409: {"description": "The file on disk is not the one the run recorded"},
    },
)
def download_artifact(
    state: State, _: Reader, run_id: RunId, name: Annotated[str, Path(max_length=500)]
) -> FileResponse:
    """The artifact's bytes, as an attachment. Served from this server's artifacts root
    (CONVEYOR_ARTIFACTS_ROOT, shared with the workers); `ETag` is the recorded sha256."""
    found = artifacts.artifact_file(state.reader(), run_id, name, state.artifacts_root)
    return attachment(found)


@router.post("/{run_id}/cancel")
def cancel_run(
    request: Request,
    state: State,
    who: Writer,
    run_id: RunId,
    body: Annotated[CancelRun | None, Body()] = None,
) -> dict[str, Any]:
    """A pending run ends at once; a running one is asked to stop (409 when already ended)."""
    reason = body.reason if body else ""
    # cancel_run writes its own audit row (actor = this token) in the cancel's transaction.
    return control.cancel_run(
        state.uow(), run_id, actor=who.name, reason=reason, ip=client_ip(request)
    ).to_dict()


class SendSignal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payload: Any = Field(None, description="Any JSON value; ctx.wait_for returns it")
    key: str | None = Field(None, min_length=1, max_length=255, description="Sent once per key")


@router.post("/{run_id}/signals/{name}", status_code=202)
def send_signal(
    state: State,
    who: Writer,
    request: Request,
    run_id: RunId,
    name: Annotated[str, Path(min_length=1, max_length=200)],
    body: Annotated[SendSignal | None, Body()] = None,
) -> dict[str, Any]:
    """Send a signal to a run; a ctx.wait_for of its name receives the payload (409 when the
    run has ended; a repeated key answers the signal sent first, `new`: false)."""
    body = body or SendSignal()
    return signals.send(
        state.uow(),
        run_id,
        name,
        body.payload,
        key=body.key,
        actor=who.name,
        ip=client_ip(request),
    ).to_dict()


@router.post("/{run_id}/retry", status_code=201)
def retry_run(state: State, who: Writer, request: Request, run_id: RunId) -> dict[str, Any]:
    """A finished run again, as a new run whose parent_run_id is this one."""
    run = control.retry_run(
        state.uow(), run_id, actor=who.name, ip=client_ip(request), publisher=state.publisher
    )
    return run.to_dict()
