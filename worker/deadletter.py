"""Refused broker messages: recorded with the reason (never retried forever), logged, counted."""

from __future__ import annotations

import json
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from domain.clock import utc_now
from domain.models import dead_letters

log = structlog.get_logger("conveyor.worker")

MAX_BODY_CHARS = 10_000
rejected_total = 0


def dead_letter(engine: Engine, task: str, request: Any, reason: str) -> None:
    """Record a message conveyor will not process; the broker has it acked already."""
    global rejected_total
    rejected_total += 1
    body = {
        "args": _jsonable(getattr(request, "args", None)),
        "kwargs": _jsonable(getattr(request, "kwargs", None)),
    }
    message_id = getattr(request, "id", None)
    log.error("message.rejected", task=task, message_id=message_id, reason=reason)
    try:
        with engine.begin() as conn:
            conn.execute(
                dead_letters.insert().values(
                    ts=utc_now(), task=task, message_id=message_id, body=body, reason=reason
                )
            )
    except DBAPIError as exc:
        log.error("message.dead_letter_failed", message_id=message_id, reason=str(exc.orig))


def _jsonable(value: Any) -> Any:
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        text = json.dumps(repr(value))
    if len(text) > MAX_BODY_CHARS:
        return {"truncated": text[:MAX_BODY_CHARS]}
    return json.loads(text)
