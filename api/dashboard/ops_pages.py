"""The dashboard's pages beyond runs: schedules (next fires, fire ledger), pipelines, projects
and their budgets, rate limits and concurrency keys, and the audit log. Each reads through the
domain function its API route reads through, so a page and /api/v1 never disagree."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from api.dashboard import pages
from api.dashboard.session import Viewer
from api.routes_schedules import slots_for
from api.state import State
from domain.clock import utc_now
from domain.costs import projects
from domain.errors import ConveyorError
from domain.flow import manage as limits
from domain.pipelines.reads import list_pipelines, pipeline_detail
from domain.schedules import manage as schedules
from domain.schedules.definitions import ScheduleView
from domain.security import audit
from domain.security.tokens import Forbidden

router = APIRouter(route_class=pages.PageRoute, include_in_schema=False)

NEXT_FIRES = 3
MORE_FIRES = 10
LEDGER = 50
AUDIT_PAGE = 50
Text = Annotated[str, Query(max_length=200)]


@dataclass(frozen=True, slots=True)
class Upcoming:
    schedule: ScheduleView
    fires: list[datetime]
    problem: str | None  # why its fire times cannot be computed


def _upcoming(view: ScheduleView, now: datetime, count: int) -> Upcoming:
    if not view.enabled:
        return Upcoming(view, [], None)
    try:
        return Upcoming(view, slots_for(view, now=now).preview(now, count), None)
    except ConveyorError as exc:  # a stored schedule the scheduler cannot fire either
        return Upcoming(view, [], str(exc))


@router.get("/schedules")
def schedules_page(request: Request, state: State, who: Viewer) -> Response:
    now = utc_now()
    shown = [_upcoming(view, now, NEXT_FIRES) for view in schedules.list_schedules(state.reader())]
    return pages.render(request, "schedules.html", who, schedules=shown, now=now)


@router.get("/schedules/{name}")
def schedule_page(request: Request, state: State, who: Viewer, name: str) -> Response:
    now = utc_now()
    view = schedules.get_schedule(state.reader(), name)
    fires = schedules.recent_fires(state.reader(), name, limit=LEDGER)
    return pages.render(
        request, "schedule.html", who, up=_upcoming(view, now, MORE_FIRES), fires=fires, now=now
    )


@router.get("/pipelines")
def pipelines_page(request: Request, state: State, who: Viewer) -> Response:
    found = [pipeline_detail(state.reader(), p.name) for p in list_pipelines(state.reader())]
    return pages.render(request, "pipelines.html", who, pipelines=found)


@dataclass(frozen=True, slots=True)
class Budget:
    project: dict[str, Any]
    share: float | None  # spent / limit, None without a limit

    @property
    def percent(self) -> int:
        return round(100 * min(self.share or 0.0, 1.0))


def _budget(project: dict[str, Any]) -> Budget:
    limit = project["monthly_cost_limit_usd"]
    if limit is None or Decimal(limit) == 0:
        return Budget(project, None)
    return Budget(project, float(Decimal(project["spent_usd"]) / Decimal(limit)))


@router.get("/projects")
def projects_page(request: Request, state: State, who: Viewer) -> Response:
    found = projects.list_projects(state.reader(), now=utc_now())
    return pages.render(request, "projects.html", who, budgets=[_budget(p) for p in found])


@router.get("/limits")
def limits_page(request: Request, state: State, who: Viewer) -> Response:
    view = limits.overview(state.reader(), now=utc_now())
    return pages.render(request, "limits.html", who, view=view)


@router.get("/audit")
def audit_page(
    request: Request,
    state: State,
    who: Viewer,
    actor: Text = "",
    action: Text = "",
    target_type: Text = "",
    target_id: Text = "",
    cursor: Annotated[str, Query(max_length=20)] = "",
) -> Response:
    """The audit log, newest first, a page at a time (keyset on its id); admins only, as in
    the API: it names every token's holder and what they did."""
    if not who.allows("admin"):
        raise Forbidden(f"token {who.name!r} has role {who.role}; the audit log needs admin")
    chosen = {"actor": actor, "action": action, "target_type": target_type, "target_id": target_id}
    page = audit.list_entries(
        state.reader(),
        **{key: value or None for key, value in chosen.items()},
        limit=AUDIT_PAGE,
        cursor=cursor or None,
    )
    kept = [(key, value) for key, value in chosen.items() if value]
    return pages.render(
        request, "audit.html", who, page=page, chosen=chosen, kept=kept, paged=bool(cursor)
    )
