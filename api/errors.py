"""One error shape for every 4xx/5xx: {"error": {"type", "message", "field"?}}."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from starlette.exceptions import HTTPException

from domain.errors import (
    ConfigurationError,
    Conflict,
    ConveyorError,
    InvalidInput,
    NotFound,
    TransientError,
    UnknownTask,
    WaitTimeout,
)
from domain.security.tokens import Forbidden, Unauthorized
from domain.webhooks.inbound import BadDelivery

log = structlog.get_logger("conveyor.api")

MAX_MESSAGE = 500


class RateLimited(ConveyorError):
    """Too many failed authentication attempts from this address; try again later."""

    def __init__(self, message: str | None = None, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PayloadTooLarge(HTTPException):
    """A request body over the endpoint's limit. An HTTPException, so FastAPI re-raises it
    from its own body reading instead of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body: larger than the limit of {limit} bytes")


# Checked in order: the first class that matches decides the status.
_STATUS: list[tuple[type[ConveyorError], int]] = [
    (RateLimited, 429),
    (Unauthorized, 401),
    (Forbidden, 403),
    (ConfigurationError, 500),
    (BadDelivery, 400),
    (UnknownTask, 422),
    (InvalidInput, 422),
    (NotFound, 404),
    (Conflict, 409),
    (TransientError, 503),
    (WaitTimeout, 504),
]


def error_body(kind: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": message[:MAX_MESSAGE]}
    if field:
        error["field"] = field
    return {"error": error}


def error_response(
    status: int,
    kind: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(kind, message, field), status_code=status, headers=headers)


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def status_for(exc: ConveyorError) -> int:
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 500)


async def _conveyor_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConveyorError)
    status = status_for(exc)
    headers: dict[str, str] = {}
    message = str(exc)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after_s)
    if status >= 500:
        # The operator's log has the detail; the caller gets no internals.
        log.error("api.error", error=snake(type(exc).__name__), reason=message, path=_path(request))
        if isinstance(exc, ConfigurationError):
            message = "the server is misconfigured; the operator's log says how"
    field = getattr(exc, "field", None)
    return error_response(status, snake(type(exc).__name__), message, field, headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return error_response(422, "invalid_input", _json_problem(err, exc.body), "body")
    loc = [str(part) for part in err.get("loc", ())]
    if loc and loc[0] in {"query", "path", "header", "cookie"}:
        where = loc[1:2]  # a parameter's name, not the index of a repeated value
    elif loc and loc[0] == "body":
        where = loc[1:]
    else:
        where = loc
    field = ".".join(where) or (loc[0] if loc else None)
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    shown = repr(err.get("input"))
    if err.get("type") not in {"missing", "extra_forbidden"} and len(shown) <= 80:
        message = f"{message} (got {shown})"
    return error_response(422, "invalid_input", f"{field or 'request'}: {message}", field)


def _json_problem(err: dict[str, Any], document: Any) -> str:
    """`body: invalid JSON at line 1 column 2: Expecting value` from FastAPI's decode error,
    whose loc holds the character offset (not a field)."""
    offset = err["loc"][-1] if err.get("loc") else None
    reason = str((err.get("ctx") or {}).get("error", "")).strip()
    where = ""
    if isinstance(offset, int) and isinstance(document, str | bytes):
        text = document if isinstance(document, str) else document.decode("utf-8", "replace")
        line = text.count("\n", 0, offset) + 1
        column = offset - (text.rfind("\n", 0, offset) + 1) + 1
        where = f" at line {line} column {column}"
    return f"body: invalid JSON{where}" + (f": {reason}" if reason else "")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 413:
        kind = "payload_too_large"
    else:
        try:
            kind = snake(HTTPStatus(status).phrase.replace(" ", "").replace("-", ""))
        except ValueError:
            kind = "http_error"
    message = str(exc.detail)
    if status == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {_path(request)}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {_path(request)}"
    return error_response(status, kind, message, headers=dict(exc.headers or {}) or None)


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value the request carried (a NUL character in text, a number out
    # of its range): the caller's input, not an outage.
    return error_response(
        422,
        "invalid_input",
        "the request holds a value the database cannot store "
        "(e.g. a NUL character in text, or a number out of range)",
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    # A driver error that escaped a unit of work: log it, tell the caller only what it means.
    log.error("api.database_error", reason=str(exc).splitlines()[0], path=_path(request))
    return error_response(503, "database_unavailable", "the database is not available")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("api.internal_error", path=_path(request))
    return error_response(500, "internal_error", "internal server error")


def _path(request: Request) -> str:
    return request.url.path[:200]


#: Each kind of error and its handler, most specific first (DataError is a DBAPIError).
_HANDLERS: list[tuple[type[Exception], Any]] = [
    (ConveyorError, _conveyor_error),
    (RequestValidationError, _validation_error),
    (HTTPException, _http_error),
    (DataError, _data_error),
    (DBAPIError, _database_error),
    (Exception, _internal_error),
]


async def answer(request: Request, exc: Exception) -> JSONResponse:
    """What the API answers for `exc`, logged as it logs it: for a caller (the dashboard) that
    shows the same status and message in another form."""
    handler = next(handler for cls, handler in _HANDLERS if isinstance(exc, cls))
    response: JSONResponse = await handler(request, exc)
    return response


def install(app: FastAPI) -> None:
    """Route every error through the one shape."""
    for cls, handler in _HANDLERS:
        app.add_exception_handler(cls, handler)
