"""The dashboard's pages and actions: overview, runs, a run; login and logout; cancel and
retry. Each reads through the same domain reads and services as the API's routes."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import sse
from api.auth import client_ip, principal_for
from api.dashboard import pages, session
from api.dashboard.session import Form, Viewer
from api.errors import RateLimited
from api.state import State
from domain.clock import utc_now
from domain.runs import control
from domain.runs import reads as queries
from domain.runs.overview import read_overview
from domain.runs.repository import RunFilter
from domain.runs.states import ALL_STATUSES, TERMINAL
from domain.security import audit
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
    request: Request,
    state: State,
    who: Viewer,
    status: Annotated[list[str], Query(max_length=len(ALL_STATUSES))] = [],  # noqa: B006
    name: Text = "",
    project: Text = "",
    queue: Text = "",
    cursor: Text = "",
) -> Response:
    """Runs newest first, filtered; a page's `next` link carries its keyset cursor."""
    chosen = [s for s in status if s]
    filters = RunFilter(
        status=chosen, name=name or None, project=project or None, queue=queue or None
    )
    page = state.reads.page(filters, limit=PAGE_SIZE, cursor=cursor or None)
    kept = [("status", s) for s in chosen] + [
        (key, value)
        for key, value in (("name", name), ("project", project), ("queue", queue))
        if value
    ]
    return pages.render(
        request,
        "runs.html",
        who,
        page=page,
        statuses=ALL_STATUSES,
        chosen=set(chosen),
        filters={"name": name, "project": project, "queue": queue},
        kept=kept,
        paged=bool(cursor),
    )


@router.get("/runs/{run_id}")
def run(request: Request, state: State, who: Viewer, run_id: uuid.UUID) -> Response:
    detail = state.reads.detail(run_id)
    lines = state.reads.last_lines(run_id, limit=LOG_LINES)
    children = queries.child_runs(state.reader(), run_id)
    return pages.render(
        request,
        "run.html",
        who,
        run=detail.run,
        detail=detail,
        # Masked as the API masks what it shows of a caller's input (the audit log).
        params=audit.mask(detail.run.params),
        result=audit.mask(detail.run.result),
        lines=lines,
        last_seq=lines[-1].seq if lines else 0,
        children=children,
        finished=detail.run.status in TERMINAL,
    )


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
