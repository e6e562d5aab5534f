"""POST /hooks/{name}: signed deliveries in, one run per producer delivery id."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from api.errors import status_for
from api.state import ApiState, State
from domain.errors import Conflict, ConveyorError, NotFound
from domain.webhooks import inbound as webhooks
from domain.webhooks.batches import Delivery
from domain.webhooks.inbound import BadDelivery

router = APIRouter(tags=["webhooks"])

HookName = Annotated[str, Path(min_length=1, max_length=200)]


@contextmanager
def _outcome(state: ApiState) -> Iterator[list[str]]:
    """Count every delivery once, by how it ended (the route sets the success outcome)."""
    outcome = ["error"]
    try:
        yield outcome
    except HTTPException as exc:
        outcome[0] = "too_large" if exc.status_code == 413 else "bad_request"
        raise
    except ConveyorError as exc:
        status = status_for(exc)
        if isinstance(exc, NotFound) and status == 404:
            outcome[0] = "not_found"
        elif status == 401:
            outcome[0] = "unauthorized"
        elif isinstance(exc, BadDelivery):
            outcome[0] = "bad_request"
        elif isinstance(exc, Conflict):
            outcome[0] = "conflict"
        elif status == 422:
            outcome[0] = "invalid"
        raise
    finally:
        state.metrics.webhooks.labels(outcome[0]).inc()


@router.post(
    "/hooks/{name}",
    status_code=202,
    responses={200: {"description": "Duplicate delivery: the run it created before"}},
)
async def deliver(state: State, request: Request, name: HookName) -> JSONResponse:
    """Headers: `X-Conveyor-Signature: sha256=<hex HMAC-SHA256 of "{timestamp}.{body}">`,
    `X-Conveyor-Timestamp` (unix seconds, within 5 minutes), `X-Conveyor-Delivery` (unique
    per delivery). The JSON object body becomes the run's params.
    202 {"run_id"} for a new delivery; 200 with the same run_id for a repeated one."""
    headers = request.headers
    with _outcome(state) as outcome:
        # The body-limit middleware refuses an oversized body before or while it streams in.
        body = await request.body()
        # Checked (endpoint, timestamp, delivery id, signature, JSON) and written in a batch
        # with the deliveries that arrive meanwhile; answered after its transaction commits.
        result = await state.intake.submit(
            Delivery(
                name=name,
                timestamp=headers.get("x-conveyor-timestamp"),
                delivery_id=headers.get("x-conveyor-delivery"),
                signature=headers.get("x-conveyor-signature"),
                body=body,
            )
        )
        outcome[0] = "accepted" if result.created else "duplicate"
    return JSONResponse({"run_id": str(result.run.id)}, status_code=202 if result.created else 200)


@router.post(
    "/hooks/pipelines/{name}/{key}",
    status_code=202,
    responses={200: {"description": "Repeated X-Conveyor-Delivery: the run it created"}},
)
async def legacy_pipeline_hook(
    state: State, request: Request, name: HookName, key: Annotated[str, Path(max_length=500)]
) -> JSONResponse:
    """Fast-Flow's `webhook_key` trigger, only when CONVEYOR_PIPELINE_LEGACY_WEBHOOKS is on
    (the key travels in the URL; prefer signed webhooks). The JSON object body, if any,
    becomes the run's params; an optional `X-Conveyor-Delivery` makes repeats one run."""
    from domain.pipelines.discovery import pipeline_directory_for
    from domain.webhooks import fastflow_keys as legacy_hooks

    with _outcome(state) as outcome:
        if not state.settings.pipeline_legacy_webhooks:
            raise legacy_hooks.LegacyHookNotFound()
        body = await request.body()
        params = webhooks.parse_payload(body) if body.strip() else {}
        directory = pipeline_directory_for(state.settings)
        result = await run_in_threadpool(
            legacy_hooks.accept,
            state.uow(),
            directory,
            name,
            key,
            params,
            delivery_id=request.headers.get("x-conveyor-delivery"),
            publisher=state.publisher,
            catalog=state.catalog,
        )
        outcome[0] = "accepted" if result.created else "duplicate"
    return JSONResponse({"run_id": str(result.run.id)}, status_code=202 if result.created else 200)
