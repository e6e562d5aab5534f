"""Rendering the dashboard: its templates, the headers every page carries, the chart's
geometry, and error pages in place of the API's JSON errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from api import errors
from api.dashboard import session
from api.errors import status_for
from api.state import get_state
from domain.errors import ConveyorError
from domain.runs.overview import Minute
from domain.security.tokens import Principal

log = structlog.get_logger("conveyor.api.dashboard")

HERE = Path(__file__).parent
STATIC = HERE / "static"
ASSETS = "/static/dashboard"

#: Shown for a value that is not there (no start time yet, no duration).
NONE = "\N{EN DASH}"

#: Nothing but this server: no CDN, no inline script, no framing by other sites.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

templates = Jinja2Templates(directory=HERE / "templates")


def age(seconds: float | None) -> str:
    """A duration as people read it: 42s, 3m 12s, 5h 01m, 2d 3h."""
    if seconds is None:
        return NONE
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def when(value: datetime | None) -> str:
    return NONE if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def in_zone(value: datetime | None, zone: str) -> str:
    """A UTC time as the clock in `zone` shows it, with the zone's abbreviation."""
    if value is None:
        return NONE
    try:
        local = value.astimezone(ZoneInfo(zone))
    except (ZoneInfoNotFoundError, ValueError):
        return f"{when(value)} UTC"
    return local.strftime("%Y-%m-%d %H:%M:%S %Z")


def usd(value: Decimal | None) -> str:
    """Money as an exact decimal, without exponent or trailing zeros: 0, 0.00019, 12.5."""
    return NONE if value is None else format(value.normalize(), "f")


def as_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


templates.env.filters.update(age=age, when=when, in_zone=in_zone, usd=usd, as_json=as_json)


def render(
    request: Request,
    name: str,
    who: Principal | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page, with a CSRF token for its forms (and the key cookie, the first time)."""
    key = session.csrf_key(request)
    fresh = key is None
    if key is None:
        key = session.new_csrf_key()
    context.update(
        who=who,
        csrf=session.csrf_token(key, session.session_of(request)),
        assets=ASSETS,
        can_write=who is not None and who.allows("write"),
        auth_disabled=get_state(request).auth_disabled,
    )
    response = templates.TemplateResponse(
        request, name, context, status_code=status_code, headers=HEADERS
    )
    if fresh:
        session.set_cookie(request, response, session.CSRF_COOKIE, key)
    return response


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303, headers=HEADERS)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return render(request, "error.html", None, status_code=status, status=status, message=message)


async def failure_page(request: Request, exc: Exception) -> HTMLResponse:
    """The API's status and message for `exc` (logged once, there, with no internals in the
    message), as a page."""
    answer = await errors.answer(request, exc)
    message = json.loads(bytes(answer.body))["error"]["message"]
    return error_page(request, answer.status_code, message)


def wants_page(request: Request) -> bool:
    """A browser navigating to a dashboard path (not a client of the API or the webhooks)."""
    path = request.url.path
    api_paths = ("/api/", "/hooks/", "/metrics", "/healthz", "/readyz", "/openapi.json")
    return "text/html" in request.headers.get("accept", "") and not path.startswith(api_paths)


class PageRoute(APIRoute):
    """A dashboard route: a person, not a client, reads its errors, so they come as pages
    (the login page when the session is missing or stale) instead of the API's JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                return await handler(request)
            except session.LoginRequired as exc:
                response = redirect(session.login_url(exc.next_path))
                if exc.clear:
                    response.delete_cookie(session.SESSION_COOKIE, path="/")
                return response
            except session.CsrfRefused:
                log.warning("dashboard.csrf_refused", path=request.url.path)
                return error_page(
                    request,
                    403,
                    "This form has expired or did not come from this dashboard; "
                    "reload the page and try again.",
                )
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                field = ".".join(str(p) for p in first.get("loc", ())[1:]) or "input"
                return error_page(request, 422, f"{field}: {first.get('msg', 'invalid')}")
            except ConveyorError as exc:
                status = status_for(exc)
                if status < 500:
                    return error_page(request, status, str(exc))
                return await failure_page(request, exc)
            except Exception as exc:  # a crash, the database gone: a page, not JSON
                return await failure_page(request, exc)

        return page


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    width: float
    ended_y: float
    ended_h: float
    failed_y: float
    failed_h: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    peak: int
    bars: list[Bar]
    first: str
    last: str


def chart(minutes: list[Minute], *, width: int = 600, height: int = 120) -> Chart:
    """Bars for an inline SVG: one per minute, ended runs in full, failures over them."""
    peak = max((m.ended for m in minutes), default=0)
    scale = height / peak if peak else 0.0
    step = width / max(1, len(minutes))
    bars = []
    for i, m in enumerate(minutes):
        ended_h = m.ended * scale
        failed_h = m.failed * scale
        bars.append(
            Bar(
                x=round(i * step, 2),
                width=round(max(1.0, step - 1), 2),
                ended_y=round(height - ended_h, 2),
                ended_h=round(ended_h, 2),
                failed_y=round(height - failed_h, 2),
                failed_h=round(failed_h, 2),
                label=f"{m.start:%H:%M}: {m.ended} ended, {m.failed} failed",
            )
        )
    first = f"{minutes[0].start:%H:%M}" if minutes else ""
    last = f"{minutes[-1].start:%H:%M}" if minutes else ""
    return Chart(width, height, peak, bars, first, last)


@dataclass(frozen=True, slots=True)
class Line:
    """One metric as an SVG polyline over the run's time, with its range for the legend."""

    name: str
    points: str
    low: float
    high: float


def line(
    name: str,
    samples: list[tuple[datetime, float]],
    start: datetime,
    end: datetime,
    *,
    width: int = 600,
    height: int = 100,
) -> Line | None:
    """`samples` scaled into a box of width by height: time across, value up from the floor."""
    if not samples:
        return None
    span = max((end - start).total_seconds(), 1e-9)
    values = [v for _, v in samples]
    low, high = min(values), max(values)
    rise = (high - low) or 1.0
    coords = " ".join(
        f"{round(width * (ts - start).total_seconds() / span, 1)},"
        f"{round(height - height * (v - low) / rise, 1)}"
        for ts, v in samples
    )
    return Line(name, coords, low, high)


@dataclass(frozen=True, slots=True)
class Span:
    """A bar on a timeline: a step or an attempt, placed by when it started and ended."""

    label: str
    x: float
    width: float
    cls: str


def spans(
    items: Sequence[tuple[str, datetime | None, datetime | None, str]],
    start: datetime,
    end: datetime,
    *,
    width: int = 600,
) -> list[Span]:
    """(label, started, finished, css class) → bars; one not finished runs to `end`."""
    total = max((end - start).total_seconds(), 1e-9)
    bars = []
    for label, began, ended, cls in items:
        if began is None:
            continue
        x = width * max(0.0, (began - start).total_seconds()) / total
        right = width * max(0.0, ((ended or end) - start).total_seconds()) / total
        bars.append(Span(label, round(x, 1), round(max(2.0, right - x), 1), cls))
    return bars
