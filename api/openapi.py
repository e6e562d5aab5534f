"""The OpenAPI document as clients need it: the bearer scheme on every route that takes a
token, the response each route really sends, and the one error shape for 4xx answers.

The routes return views and dicts (encoded by orjson, not validated by FastAPI: see
api/json_body.py), so their response models are declared here, built from the same views,
and written into the document only. A route added without one fails tests/api/test_openapi.py.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, get_type_hints

from fastapi import FastAPI, routing
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, create_model
from pydantic.json_schema import models_json_schema
from sqlalchemy import Table

from domain.db.models_platform import Schedule
from domain.housekeeping.stats import Bucket, Stats
from domain.runs.artifacts import ArtifactView
from domain.runs.reads import CostLine, MetricPoint, WorkerView
from domain.runs.signals import SignalView
from domain.runs.views import LogLine, RunView, StepView
from domain.security.audit import AuditEntry
from domain.security.tokens import TokenView
from domain.webhooks.inbound import WebhookView

BEARER = "bearer"


class ErrorDetail(BaseModel):
    type: str = Field(description="What kind of error, e.g. invalid_input, run_not_found")
    message: str = Field(description="One line for a person; names the field when there is one")
    field: str | None = Field(None, description="The input field at fault, when there is one")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: ErrorDetail


def _view(cls: type, name: str | None = None, **extra: Any) -> type[BaseModel]:
    """A response model with a dataclass view's fields (as its to_dict writes them) and
    `extra` ones (name=(type, default))."""
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {f.name: (hints[f.name], ...) for f in dataclasses.fields(cls)}
    fields.update(extra)
    model: type[BaseModel] = create_model(name or cls.__name__.removesuffix("View"), **fields)
    return model


def _table(name: str, table: Table, **extra: Any) -> type[BaseModel]:
    """A response model with a table's columns, for views that are a row."""
    fields: dict[str, Any] = {}
    for column in table.columns:
        try:
            kind: Any = column.type.python_type
        except NotImplementedError:  # JSON columns
            kind = Any
        fields[column.name] = (kind | None if column.nullable else kind, ...)
    fields.update(extra)
    model: type[BaseModel] = create_model(name, **fields)
    return model


def _items(name: str, item: Any, *, cursor: bool = False, **extra: Any) -> type[BaseModel]:
    fields: dict[str, Any] = {"items": (list[item], ...), **extra}
    if cursor:
        fields["next_cursor"] = (str | None, Field(description="Pass back as cursor"))
    model: type[BaseModel] = create_model(name, **fields)
    return model


Run = _view(RunView, "Run")
CreatedRun = _view(RunView, "CreatedRun", warnings=(list[str], ...))
Step = _view(StepView, "Step")
DetailStep = _view(StepView, "DetailStep", duration_s=(float | None, ...), replayed=(bool, ...))
Cost = _view(CostLine, "Cost")
RunDetail = _view(
    RunView,
    "RunDetail",
    duration_s=(float | None, ...),
    steps=(list[DetailStep], ...),  # type: ignore[valid-type]
    totals=(dict[str, Any], ...),
    costs=(list[dict[str, Any]], ...),
)
ScheduleModel = _table("Schedule", Schedule.__table__)  # type: ignore[arg-type]
ScheduleDetail = _table(
    "ScheduleDetail",
    Schedule.__table__,  # type: ignore[arg-type]
    fires=(list[dict[str, Any]], ...),
)


class Pipeline(BaseModel):
    name: str
    description: str | None = None
    tags: list[str] | None = None
    enabled: bool
    error: str | None = None
    warnings: Any = None
    counters: dict[str, int]


class PipelineDetail(Pipeline):
    path: str | None = None
    config: dict[str, Any] | None = None
    last_run: dict[str, Any] | None = None
    last_failure: dict[str, Any] | None = None
    last_error: str | None = None


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    revision: str | None


class QueueDepth(BaseModel):
    queue: str
    depth: int


class Queues(BaseModel):
    items: list[QueueDepth]
    broker: str | None = None


class Accepted(BaseModel):
    run_id: str


class CostReport(BaseModel):
    by: str
    items: list[dict[str, Any]]
    total_usd: str = Field(description="Exact decimal, as a string")


class RateLimitUsage(BaseModel):
    name: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    defined_in: str = Field(description="Where it was defined last: code, cli or api")
    updated_at: datetime
    requests_used: int = Field(description="Taken in the last 60 s (all workers)")
    tokens_used: int
    requests_left: int | None = Field(description="None: requests are not limited")
    tokens_left: int | None
    waiting: int = Field(description="Runs waiting for room: to start, or in ctx.acquire")


class ConcurrencyKey(BaseModel):
    key: str
    max: int
    running: int
    waiting: int


class Limits(BaseModel):
    rate_limits: list[RateLimitUsage]
    concurrency: list[ConcurrencyKey] = Field(description="Keys held or waited for, busiest")


Token = _view(TokenView, "Token")
Webhook = _view(WebhookView, "Webhook", path=(str, ...))

#: The success response of every JSON route, by "METHOD path".
RESPONSES: dict[str, type[BaseModel]] = {
    "POST /hooks/{name}": Accepted,
    "POST /hooks/pipelines/{name}/{key}": Accepted,
    "GET /api/v1/runs": _items("RunPage", Run, cursor=True),
    "POST /api/v1/runs": CreatedRun,
    "GET /api/v1/runs/{run_id}": RunDetail,
    "GET /api/v1/runs/{run_id}/logs": _items(
        "LogPage", _view(LogLine, "LogLine"), next_after_seq=(int, ...)
    ),
    "GET /api/v1/runs/{run_id}/metrics": _items("MetricPoints", _view(MetricPoint, "MetricPoint")),
    "GET /api/v1/runs/{run_id}/costs": _items("RunCosts", Cost, total=(dict[str, Any], ...)),
    "GET /api/v1/runs/{run_id}/artifacts": _items("Artifacts", _view(ArtifactView, "Artifact")),
    "POST /api/v1/runs/{run_id}/cancel": Run,
    "POST /api/v1/runs/{run_id}/retry": Run,
    "POST /api/v1/runs/{run_id}/signals/{name}": _view(SignalView, "Signal"),
    "GET /healthz": Health,
    "GET /readyz": Ready,
    "GET /api/v1/queues": Queues,
    "GET /api/v1/schedules": _items("Schedules", ScheduleModel),
    "POST /api/v1/schedules": ScheduleModel,
    "POST /api/v1/schedules/preview": _items("Preview", datetime),
    "GET /api/v1/schedules/{name}": ScheduleDetail,
    "PUT /api/v1/schedules/{name}": ScheduleModel,
    "POST /api/v1/schedules/{name}/pause": ScheduleModel,
    "POST /api/v1/schedules/{name}/resume": ScheduleModel,
    "GET /api/v1/schedules/{name}/preview": _items("SchedulePreview", datetime),
    "POST /api/v1/schedules/{name}/fire": Run,
    "GET /api/v1/pipelines": _items("Pipelines", Pipeline),
    "GET /api/v1/pipelines/{name}": PipelineDetail,
    "POST /api/v1/pipelines/{name}/trigger": Run,
    "GET /api/v1/stats": _view(Stats, "Stats", items=(list[_view(Bucket, total=(int, ...))], ...)),  # type: ignore[misc]
    "GET /api/v1/costs": CostReport,
    "GET /api/v1/limits": Limits,
    "PUT /api/v1/limits/{name}": RateLimitUsage,
    "GET /api/v1/audit": _items("AuditPage", _view(AuditEntry, "AuditEntry"), cursor=True),
    "GET /api/v1/workers": _items("Workers", _view(WorkerView, "Worker")),
    "GET /api/v1/tokens": _items("Tokens", Token),
    "POST /api/v1/tokens": _view(TokenView, "CreatedToken", token=(str, ...)),
    "DELETE /api/v1/tokens/{name}": Token,
    "GET /api/v1/webhooks": _items("Webhooks", Webhook),
    "POST /api/v1/webhooks": _view(
        WebhookView, "CreatedWebhook", path=(str, ...), secret=(str, ...)
    ),
}

_ERRORS = {
    "401": "No bearer token, or one that is unknown or revoked",
    "403": "The token's role may not do this",
    "404": "Nothing by that name or id",
    "409": "Refused by the current state (e.g. already ended, key reused)",
    "422": "Invalid input; error.field names the field",
    "503": "Not ready, or a service it needs is down; the message says why",
}


def role_of(route: Any) -> str | None:
    """The role a route's token must have (api.auth.requires marks its dependency)."""
    todo = [route.dependant]
    while todo:
        dependant = todo.pop()
        role = getattr(dependant.call, "role", None)
        if role is not None:
            return str(role)
        todo.extend(dependant.dependencies)
    return None


def install(app: FastAPI) -> None:
    """Replace app.openapi with one that writes the document described above (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    components["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token (conveyor tokens create)",
        }
    }
    models: list[type[BaseModel]] = [ErrorBody, *RESPONSES.values()]
    refs, defs = models_json_schema(
        [(model, "serialization") for model in models], ref_template="#/components/schemas/{model}"
    )
    made = defs.get("$defs", {})
    clash = sorted(set(made) & set(schemas))
    assert not clash, f"response models named like request models: {clash}"
    schemas.update(made)
    error_ref = refs[(ErrorBody, "serialization")]
    for context in routing.iter_route_contexts(app.routes):
        original = context.original_route
        if not isinstance(original, APIRoute) or not original.include_in_schema:
            continue  # pages (/docs, the dashboard) are not part of the document
        route: Any = context  # an APIRoute as included: prefix, dependencies and all
        for method in route.methods:
            operation = doc["paths"][route.path_format][method.lower()]
            _describe(operation, route, method, refs, error_ref)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return doc


def _describe(
    operation: dict[str, Any],
    route: Any,
    method: str,
    refs: dict[Any, Any],
    error_ref: dict[str, Any],
) -> None:
    responses = operation.setdefault("responses", {})
    model = RESPONSES.get(f"{method} {route.path_format}")
    if model is not None:
        for status in (str(route.status_code or 200), "200"):
            if status in responses:
                content = responses[status].setdefault("content", {})
                content["application/json"] = {"schema": refs[(model, "serialization")]}
    role = role_of(route)
    codes = ["422"] if route.dependant.path_params or route.dependant.query_params else []
    if route.body_field is not None:
        codes = ["422"]
    if role is not None:
        operation["security"] = [{BEARER: []}]
        codes += ["401", "403"]
    if route.dependant.path_params:
        codes.append("404")
    if method in {"POST", "PUT", "DELETE"}:
        codes.append("409")
    for code in sorted(set(codes) | ({"409", "422", "503"} & set(responses))):
        responses[code] = {
            "description": _ERRORS[code],
            "content": {"application/json": {"schema": error_ref}},
        }
