"""The dashboard's pages and actions: overview, runs, a run; login and logout; cancel and
retry. Each reads through the same domain reads and services as the API's routes."""

from __future__ import annotations

import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import sse
from api.auth import client_ip, principal_for
from api.dashboard import pages, session
from api.dashboard.filters import QueryFilter
from api.dashboard.session import Form, Viewer
from api.downloads import attachment
from api.errors import RateLimited
from api.state import State
from domain.clock import utc_now
from domain.errors import InvalidInput
from domain.runs import artifacts, control, signals
from domain.runs import reads as queries
from domain.runs.overview import read_overview
from domain.runs.states import ALL_STATUSES, TERMINAL
from domain.runs.views import RunView, StepView
from domain.security.tokens import Forbidden, Principal, Unauthorized

router = APIRouter(route_class=pages.PageRoute, include_in_schema=False)

PAGE_SIZE = 50
LOG_LINES = 200
Text = Annotated[str, Query(max_length=200)]


@router.get("/")
def overview(request: Request, state: State, who: Viewer) -> Response:
    view = read_overview(state.reader(), now=utc_now())
    return pages.render(request, "overview.html", who, view=view, chart=pages.chart(view.minutes))


@router.get("/runs")
def runs(
    request: Request, state: State, who: Viewer, chosen: QueryFilter, cursor: Text = ""
) -> Response:
    """Runs newest first, filtered; a page's `next` link carries its keyset cursor."""
    page = state.reads.page(chosen.filters, limit=PAGE_SIZE, cursor=cursor or None)
    return pages.render(
        request,
        "runs.html",
        who,
        page=page,
        statuses=ALL_STATUSES,
        chosen=chosen,
        picked=set(chosen.statuses),
        kept=chosen.kept,
        paged=bool(cursor),
    )


@router.get("/runs/{run_id}")
def run(request: Request, state: State, who: Viewer, run_id: uuid.UUID) -> Response:
    detail = state.reads.detail(run_id).masked()
    view = detail.run
    lines = state.reads.last_lines(run_id, limit=LOG_LINES)
    children = queries.child_runs(state.reader(), run_id)
    attempts = queries.attempt_spans(state.reader(), run_id)
    start = view.started_at or view.created_at
    end = view.finished_at or max(utc_now(), start)
    metrics = [
        pages.line(name, [(p.ts, p.value) for p in points], start, end)
        for name in ("cpu_percent", "rss_bytes")
        if (points := queries.run_metric_points(state.reader(), run_id, name=name, limit=1000))
    ]
    waiting_at = _waiting_at(view, detail.steps)
    steps = [
        (
            f"{s.name} ({s.status})",
            s.started_at,
            s.finished_at,
            _step_class(s, view.attempt, waiting_at),
        )
        for s in detail.steps
    ]
    tries = [(f"attempt {a.attempt}", a.first_ts, a.last_ts, "attempt") for a in attempts]
    return pages.render(
        request,
        "run.html",
        who,
        run=view,
        detail=detail,
        params=view.params,
        result=view.result,
        lines=lines,
        last_seq=lines[-1].seq if lines else 0,
        children=children,
        finished=view.status in TERMINAL,
        attempts=attempts,
        waiting_at=waiting_at,
        attempt_bars=pages.spans(tries, start, end),
        step_bars=pages.spans(steps, start, end),
        metrics=[m for m in metrics if m is not None],
        artifacts=artifacts.run_artifact_list(state.reader(), run_id),
        span_s=(end - start).total_seconds(),
    )


def _waiting_at(view: RunView, steps: list[StepView]) -> int | None:
    """The step a waiting run waits in: its last, when that is a durable sleep or a wait for
    a signal (each is recorded completed, with its deadline, before the run suspends)."""
    if view.status == "waiting" and steps and steps[-1].step_type in ("sleep", "wait"):
        return steps[-1].seq
    return None


def _step_class(step: StepView, attempt: int, waiting_at: int | None) -> str:
    if step.seq == waiting_at:
        return "waiting"
    return "replayed" if step.replayed(attempt) else step.status


@router.get("/runs/{run_id}/artifacts/{name:path}")
def artifact(
    state: State, _: Viewer, run_id: uuid.UUID, name: Annotated[str, Path(max_length=500)]
) -> Response:
    """An artifact's file for a browser with a session cookie (the API's download)."""
    return attachment(artifacts.artifact_file(state.reader(), run_id, name, state.artifacts_root))


@router.get("/runs/{run_id}/logs/stream")
async def stream(
    state: State, _: Viewer, run_id: uuid.UUID, after_seq: Annotated[int, Query(ge=0)] = 0
) -> StreamingResponse:
    """The API's live log stream (api/sse.py), for a browser that holds a session cookie:
    an EventSource cannot send a bearer header."""
    await run_in_threadpool(control.get_run, state.reader(), run_id)
    return StreamingResponse(
        sse.follow(state, run_id, after_seq),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/runs/{run_id}/cancel")
def cancel(
    request: Request, state: State, who: Viewer, fields: Form, run_id: uuid.UUID
) -> Response:
    _may_write(who)
    control.cancel_run(
        state.uow(),
        run_id,
        actor=who.name,
        reason=fields.get("reason", "")[:500],
        ip=client_ip(request),
    )
    return pages.redirect(f"/runs/{run_id}")


@router.post("/runs/{run_id}/retry")
def retry(request: Request, state: State, who: Viewer, _: Form, run_id: uuid.UUID) -> Response:
    _may_write(who)
    again = control.retry_run(
        state.uow(), run_id, actor=who.name, ip=client_ip(request), publisher=state.publisher
    )
    return pages.redirect(f"/runs/{again.id}")


@router.post("/runs/{run_id}/signal")
def signal(
    request: Request, state: State, who: Viewer, fields: Form, run_id: uuid.UUID
) -> Response:
    """Send a signal, as POST /api/v1/runs/{id}/signals/{name} does; payload is JSON text."""
    _may_write(who)
    text = fields.get("payload", "").strip()
    try:
        payload = json.loads(text) if text else None
    except ValueError:
        raise InvalidInput(
            "payload: not JSON (leave it empty to send none)", field="payload"
        ) from None
    signals.send(
        state.uow(),
        run_id,
        fields.get("name", "").strip(),
        payload,
        actor=who.name,
        ip=client_ip(request),
    )
    return pages.redirect(f"/runs/{run_id}")


def _may_write(who: Principal) -> None:
    if not who.allows("write"):
        raise Forbidden(f"token {who.name!r} has role {who.role}; this needs write")


@router.get("/login")
def login_page(request: Request, state: State, next: Text = "/") -> Response:
    if state.auth_disabled:
        return pages.redirect(session.safe_next(next))
    return pages.render(request, "login.html", None, next=session.safe_next(next))


@router.post("/login")
async def login(request: Request, state: State, fields: Form) -> Response:
    """Check the token as the API would; on success it becomes the session cookie."""
    target = session.safe_next(fields.get("next"))
    token = fields.get("token", "").strip()
    try:
        await principal_for(request, token or None)
    except (Unauthorized, RateLimited) as exc:
        status = 429 if isinstance(exc, RateLimited) else 401
        return pages.render(
            request, "login.html", None, status_code=status, next=target, error=str(exc)
        )
    response = pages.redirect(target)
    if not state.auth_disabled:
        session.set_cookie(request, response, session.SESSION_COOKIE, token)
    return response


@router.post("/logout")
def logout(_: Form) -> Response:
    response = pages.redirect("/login")
    response.delete_cookie(session.SESSION_COOKIE, path="/")
    return response
