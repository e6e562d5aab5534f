"""Refused broker messages: recorded with their bytes and the reason (never retried), logged,
counted.

Whatever a message held, its row can be stored: the bytes travel as base64 (at most
MAX_RAW_BYTES of them, with the full size), text has NUL characters and lone surrogates
escaped and is cut to its column, and decoded values are kept as JSON only where a JSONB column
accepts them (else as their ASCII repr).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from domain.clock import utc_now
from domain.db.engine import describe_db_error
from domain.db.models import dead_letters
from domain.errors import DatabaseUnavailable

log = structlog.get_logger("conveyor.worker")

MAX_RAW_BYTES = 64 * 1024
MAX_VALUES_CHARS = 10_000
#: task and message_id are String(200).
MAX_NAME_CHARS = 200
UNKNOWN_TASK = "(unknown)"
rejected_total = 0


def record(
    engine: Engine, *, task: str | None, message_id: str | None, body: Any, reason: str
) -> None:
    """Store one dead letter and log it.

    Raises DatabaseUnavailable when the database cannot be reached: the caller still holds
    the message and tries again later. Any other database error propagates.
    """
    global rejected_total
    row = {
        "ts": utc_now(),
        "task": clean(task or UNKNOWN_TASK, MAX_NAME_CHARS),
        "message_id": clean(message_id, MAX_NAME_CHARS) if message_id else None,
        "body": body,
        "reason": clean(reason),
    }
    try:
        with engine.begin() as conn:
            conn.execute(dead_letters.insert().values(**row))
    except (OperationalError, InterfaceError) as exc:
        raise DatabaseUnavailable(
            describe_db_error(engine.url.render_as_string(hide_password=False), exc)
        ) from None
    rejected_total += 1
    log.error(
        "message.rejected", task=row["task"], message_id=row["message_id"], reason=row["reason"]
    )


def dead_letter(engine: Engine, task: str, request: Any, reason: str) -> None:
    """Record a task message conveyor will not process (the broker has it acked already):
    its arguments as the body. DatabaseUnavailable when the database cannot be reached."""
    values = {"args": getattr(request, "args", None), "kwargs": getattr(request, "kwargs", None)}
    record(
        engine,
        task=task,
        message_id=getattr(request, "id", None),
        body=storable(values),
        reason=reason,
    )


def raw_body(raw: bytes, size: int | None = None) -> dict[str, Any]:
    """A dead letter's body for a message's bytes: base64 of at most MAX_RAW_BYTES, and the
    full size (`size`, when `raw` is already a cut of a larger message)."""
    kept = raw[:MAX_RAW_BYTES]
    total = len(raw) if size is None else size
    return {
        "raw": base64.b64encode(kept).decode("ascii"),
        "size": total,
        "truncated": len(kept) < total,
    }


def storable(value: Any) -> Any:
    """`value` as JSON a JSONB column accepts, cut to MAX_VALUES_CHARS (then as text); its
    ASCII repr when it holds what PostgreSQL refuses in JSON (NUL, lone surrogates, NaN)."""
    try:
        text = json.dumps(value, default=repr, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")  # a lone surrogate fails here
    except (TypeError, ValueError, RecursionError):
        return {"repr": ascii(value)[:MAX_VALUES_CHARS]}
    if "\\u0000" in text:
        return {"repr": ascii(value)[:MAX_VALUES_CHARS]}
    if len(text) > MAX_VALUES_CHARS:
        return {"truncated": text[:MAX_VALUES_CHARS]}
    return json.loads(text)


def clean(text: str, limit: int | None = None) -> str:
    """`text` as any text column stores it: NUL and lone surrogates escaped (PostgreSQL refuses
    both), at most `limit` characters."""
    text = str(text).replace("\x00", "\\x00")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text
