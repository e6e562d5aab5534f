"""Bulk cancel and retry from the runs page: a confirmation page counts what a filter (or a
selection) matches, and its form acts on exactly those runs (domain/runs/bulk.py)."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.auth import client_ip
from api.dashboard import filters, pages
from api.dashboard.filters import QueryFilter
from api.dashboard.session import FormLists, Viewer
from api.state import State
from domain.errors import InvalidInput
from domain.runs import bulk
from domain.security.tokens import Forbidden, Principal

router = APIRouter(route_class=pages.PageRoute, include_in_schema=False)

#: New runs a retry's result page links to; the rest are on the runs page.
SHOWN = 50


def may_write(who: Principal) -> None:
    if not who.allows("write"):
        raise Forbidden(f"token {who.name!r} has role {who.role}; this needs write")


def _bound(text: str) -> bulk.Bound:
    try:
        at, run_id = text.split("|")
        created = datetime.fromisoformat(at)
        if created.tzinfo is None:
            raise ValueError("naive")
        return bulk.Bound(created, uuid.UUID(run_id))
    except ValueError:
        raise InvalidInput(
            "bound: not one this dashboard's confirmation page wrote; start again from the runs",
            field="bound",
        ) from None


@router.get("/runs/bulk")
def confirm(
    request: Request,
    state: State,
    who: Viewer,
    chosen: QueryFilter,
    action: str = "",
    selection: str = "",
) -> Response:
    """How many runs the action would change, and a form to change exactly those."""
    may_write(who)
    if selection and not chosen.ids:  # the "selected runs" buttons with nothing ticked
        raise InvalidInput("id: tick the runs to act on first", field="id")
    seen = bulk.preview(state.uow(), chosen.filters, action)
    bound = f"{seen.bound.created_at.isoformat()}|{seen.bound.run_id}" if seen.bound else ""
    return pages.render(
        request, "bulk.html", who, seen=seen, chosen=chosen, bound=bound, cap=bulk.MAX_BULK
    )


@router.post("/runs/bulk")
def act(request: Request, state: State, who: Viewer, fields: FormLists) -> Response:
    may_write(who)
    chosen = filters.parse(fields)
    action = bulk.check_action((fields.get("action") or [""])[0])
    bound = _bound((fields.get("bound") or [""])[0])
    ip = client_ip(request)
    if action == "cancel":
        done = bulk.cancel_matching(state.uow(), chosen.filters, bound, actor=who.name, ip=ip)
    else:
        done = bulk.retry_matching(
            state.uow(), chosen.filters, bound, actor=who.name, ip=ip, publisher=state.publisher
        )
    return pages.render(
        request, "bulk_done.html", who, done=done, chosen=chosen, shown=done.made[:SHOWN]
    )
