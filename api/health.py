"""Liveness, readiness (database, migrations, broker) and queue depths."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from api import metrics
from api.auth import Reader
from api.broker import ping, queue_depths
from api.errors import error_response
from api.state import ApiState, State
from domain.clock import utc_now
from domain.db.engine import describe_db_error
from domain.db.migrate import current_revision
from domain.housekeeping import monitoring as observability
from domain.schedules.leader import absence

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready; the message says why"}})
def readyz(state: State) -> JSONResponse:
    """Ready to serve: the database answers, its schema is at head, the broker answers, and
    a scheduler has led within CONVEYOR_NO_SCHEDULER_AFTER_S."""
    problems = _database_problems(state)
    if not problems:
        problems = _scheduler_problems(state)
    problems += _broker_problems(state)
    if problems:
        return error_response(503, "not_ready", "; ".join(problems))
    return JSONResponse({"status": "ready", "revision": state.head_revision})


def _database_problems(state: ApiState) -> list[str]:
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        revision = current_revision(state.engine)
    except DBAPIError as exc:
        url = state.engine.url.render_as_string(hide_password=False)
        return [describe_db_error(url, exc)]
    if revision != state.head_revision:
        return [
            f"database schema is at {revision or 'nothing'}, the code needs {state.head_revision} "
            "(run `conveyor migrate`)"
        ]
    return []


def _scheduler_problems(state: ApiState) -> list[str]:
    """Without a leading scheduler the API still serves, but what it accepts may not happen:
    retries, delayed runs, chains and recovery wait for one."""
    try:
        problem = absence(
            state.engine,
            now=utc_now(),
            since=state.started_at,
            silence_s=state.settings.no_scheduler_after_s,
        )
    except DBAPIError:
        return []  # gone since it answered: the next probe's database check says so
    return [problem] if problem else []


def _broker_problems(state: ApiState) -> list[str]:
    url = state.settings.broker_url
    if url.startswith("memory"):
        return []
    try:
        ping(state.redis, url)
    except OSError as exc:
        return [f"cannot reach the broker: {exc}"]
    return []


@router.get("/api/v1/queues", tags=["queues"], response_model=None)
def queues(state: State, _: Reader) -> dict[str, Any] | JSONResponse:
    """Messages waiting in the broker per queue (Redis only; other brokers list nothing)."""
    if state.redis is None:
        return {"items": [], "broker": "not redis"}
    pending = observability.pending_queues(state.reader())
    names = {state.settings.default_queue, state.settings.submit_queue, *pending}
    try:
        depths = queue_depths(state.redis, sorted(names - {""}))
    except OSError as exc:
        return error_response(503, "broker_unavailable", f"cannot reach the broker: {exc}")
    return {"items": [{"queue": q, "depth": n} for q, n in sorted(depths.items())]}


@router.get("/metrics", response_class=Response)
def prometheus(state: State) -> Response:
    """Prometheus text format."""
    return metrics.exposition(state.metrics)
