"""Who is looking at the dashboard, and whether a form they sent came from its own pages.

The session cookie holds the API token the person logged in with (HttpOnly, so no script can
read it; SameSite=Strict, so no other site's page sends it); each request checks it exactly as
the API checks a bearer token (api.auth.principal_for: cache, roles, brake on failures). With
auth disabled (`conveyor dev`) every local caller is an admin and no login is asked, as in the
API.

Forms carry a CSRF token: an HMAC, keyed with a random per-browser cookie, of the session
cookie's value, checked on every POST (double submit, tied to the session: a token from one
session is refused in another, and after logging out). The key cookie is set with the first
page that shows a form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated
from urllib.parse import parse_qs, quote

from fastapi import Depends, Request
from fastapi.responses import Response

from api.auth import principal_for
from api.state import get_state
from domain.errors import InvalidInput
from domain.security.tokens import Principal, Unauthorized

SESSION_COOKIE = "conveyor_session"
CSRF_COOKIE = "conveyor_csrf"
CSRF_FIELD = "csrf_token"
MAX_FIELDS = 20
MAX_LIST_FIELDS = 250  # a bulk form: the filter and up to 200 chosen runs


class LoginRequired(Exception):
    """No session, or one whose token no longer authenticates: the login page, then back."""

    def __init__(self, next_path: str, *, clear: bool = False) -> None:
        super().__init__(next_path)
        self.next_path = next_path
        self.clear = clear


class CsrfRefused(Exception):
    """A POST without the CSRF token of this browser's session."""


class TooManyFields(InvalidInput):
    """A form with more fields than any of the dashboard's pages sends."""


async def viewer(request: Request) -> Principal:
    """The principal behind the session cookie (everyone local is an admin in dev mode)."""
    token = request.cookies.get(SESSION_COOKIE)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if not token and not get_state(request).auth_disabled:
        raise LoginRequired(here)
    try:
        return await principal_for(request, token)
    except Unauthorized:  # revoked, or never valid: ask again, and forget the stale cookie
        raise LoginRequired(here, clear=True) from None


Viewer = Annotated[Principal, Depends(viewer)]


def csrf_key(request: Request) -> str | None:
    return request.cookies.get(CSRF_COOKIE)


def csrf_token(key: str, session: str) -> str:
    """The token forms carry: bound to this browser's key and to its session."""
    return hmac.new(key.encode(), f"csrf|{session}".encode(), hashlib.sha256).hexdigest()


def new_csrf_key() -> str:
    return secrets.token_urlsafe(32)


def session_of(request: Request) -> str:
    return request.cookies.get(SESSION_COOKIE, "")


async def _checked(request: Request, max_fields: int) -> dict[str, list[str]]:
    """A urlencoded form's fields, every value of each, after checking its CSRF token."""
    body = (await request.body()).decode("utf-8", "replace")
    try:
        fields = parse_qs(body, max_num_fields=max_fields)
    except ValueError:
        raise TooManyFields(f"a form of this dashboard has at most {max_fields} fields") from None
    key = csrf_key(request)
    sent = (fields.pop(CSRF_FIELD, None) or [""])[0]
    if not key or not hmac.compare_digest(sent, csrf_token(key, session_of(request))):
        raise CsrfRefused()
    return fields


async def form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (the first value of each), after checking its CSRF token."""
    fields = await _checked(request, MAX_FIELDS)
    return {name: values[0] for name, values in fields.items() if values}


async def form_lists(request: Request) -> dict[str, list[str]]:
    """A form whose fields repeat (the runs chosen for a bulk action), CSRF checked."""
    return await _checked(request, MAX_LIST_FIELDS)


FormLists = Annotated[dict[str, list[str]], Depends(form_lists)]
Form = Annotated[dict[str, str], Depends(form)]


def set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def login_url(next_path: str) -> str:
    return f"/login?next={quote(safe_next(next_path))}"


def safe_next(path: str | None) -> str:
    """Where to go after logging in: a path on this server, never another site. Browsers
    drop tabs and newlines from URLs and read a backslash as a slash, so "/<tab>/evil.example"
    would leave the site: any of them, or whitespace, and the answer is the overview."""
    if not path or not path.startswith("/") or path.startswith("//"):
        return "/"
    if any(c == "\\" or c.isspace() or not c.isprintable() for c in path):
        return "/"
    return path
