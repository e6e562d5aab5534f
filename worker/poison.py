"""Messages a worker refuses, and how: found at the layer that would choke on them, then
dead-lettered with their bytes and the reason, and acked only once that row is committed.

Three layers decode a message, and each gets its own check (a poison never reaches the next):

- the transport's bytes -> JSON (worker/redis_transport.py): bytes that are not a JSON message
  become a *refused envelope*, a well-formed message that carries them and the reason;
- JSON -> kombu message (`envelope_problem`, for kombu's virtual transports such as Redis): what
  kombu's Message and its unacked bookkeeping read must be there and of the right type;
- kombu message -> Celery task (`task_message_problem`, in worker/consumer.py, for every
  broker): protocol 2 only, with the headers and body shape Celery's request unpacks.

A refused message is kept unacked until its dead letter is committed: with the database down
it is retried with backoff, and a worker that stops meanwhile leaves it to the broker (kombu's
unacked hash on Redis) for the next one, so no refusal is lost and none is retried forever.
"""

from __future__ import annotations

import base64
import math
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from kombu.exceptions import ContentDisallowed
from kombu.transport.virtual.base import Channel as VirtualChannel
from sqlalchemy import Engine

from domain.db.engine import create_db_engine
from domain.errors import DatabaseUnavailable
from domain.tasks.registry import RetryPolicy
from worker import deadletter
from worker.outcomes import backoff_s

log = structlog.get_logger("conveyor.worker")

#: Header of a refused envelope: why the transport could not decode the original.
REFUSED = "x-conveyor-refused"
#: Header of a refused envelope: the original's size (its body keeps at most MAX_RAW_BYTES).
REFUSED_SIZE = "x-conveyor-refused-size"
#: Between attempts to store a dead letter while the database is down.
STORE_BACKOFF = RetryPolicy(base_s=1.0, max_s=30.0)


def refused_envelope(raw: bytes, reason: str, queue: str) -> dict[str, Any]:
    """A message for `queue` that carries `raw` (cut to MAX_RAW_BYTES) and why it was refused."""
    return {
        "body": base64.b64encode(raw[: deadletter.MAX_RAW_BYTES]).decode("ascii"),
        "content-type": "application/octet-stream",
        "content-encoding": "binary",
        "headers": {REFUSED: reason, REFUSED_SIZE: len(raw)},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
        },
    }


def envelope_problem(payload: Any) -> str | None:
    """Why kombu's virtual transports could not take `payload` (a decoded Redis item) as a
    message, or None: it mirrors what kombu's Message and QoS read from it."""
    if not isinstance(payload, dict):
        return f"not a JSON object (got {type(payload).__name__})"
    props = payload.get("properties")
    if not isinstance(props, dict):
        return "properties: expected an object"
    if not isinstance(props.get("delivery_tag"), str):
        return "properties.delivery_tag: expected a string"
    info = props.get("delivery_info")
    if not (
        isinstance(info, dict)
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    ):
        return "properties.delivery_info: expected an object with exchange and routing_key"
    if not isinstance(payload.get("headers") or {}, dict):
        return "headers: expected an object"
    for key in ("content-type", "content-encoding"):
        if not isinstance(payload.get(key) or "", str):
            return f"{key}: expected a string"
    return _body_problem(payload.get("body"), props.get("body_encoding"))


def _body_problem(body: Any, encoding: Any) -> str | None:
    if not body:
        return None  # kombu passes an empty body on as it is
    if not isinstance(body, str):
        return "body: expected a string"
    if encoding is not None and not isinstance(encoding, str):
        return "properties.body_encoding: expected a string"
    try:
        if encoding and encoding.lower() != "utf-8":
            codec = VirtualChannel.codecs.get(encoding)
            if codec is None:
                return f"properties.body_encoding: expected base64 (got {encoding!r})"
            codec.decode(body)
        else:
            body.encode("utf-8")
    except UnicodeError:
        return "body: not valid UTF-8 text"
    except ValueError as exc:  # binascii.Error
        return f"body: not valid {encoding} ({exc})"
    return None


def task_message_problem(message: Any) -> str | None:
    """Why Celery could not make a task request of `message`, or None.

    Only protocol 2 (Celery's default since 4.0) is taken: a task header, an id, and a body
    [args, kwargs, embed]. Celery checks the rest itself (unknown task names, ETA and expiry
    values) and calls the consumer's on_unknown_task / on_invalid_task.
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return "headers: expected an object"
    task = headers.get("task")
    if task is None:
        return _headerless(message)
    if not isinstance(task, str):
        return "headers.task: expected a string"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return "headers.id: expected the task id (a string)"
    if not _time_limits_ok(headers.get("timelimit")):
        return "headers.timelimit: expected [hard, soft] in seconds (numbers or null)"
    payload, problem = _decoded(message)
    if problem is not None:
        return problem
    if not (
        isinstance(payload, list | tuple)
        and len(payload) == 3
        and isinstance(payload[0], list | tuple)
        and isinstance(payload[1], dict)
        and (payload[2] is None or isinstance(payload[2], dict))
    ):
        return (
            "body: expected [args, kwargs, embed] (a list, an object, an object or null), "
            f"got {_shape(payload)}"
        )
    return None


def _headerless(message: Any) -> str:
    payload, problem = _decoded(message)
    if problem is None and isinstance(payload, dict) and "task" in payload:
        return "Celery message protocol 1 is not accepted: send with protocol 2 (the default)"
    return problem or "headers.task: missing (not a Celery task message)"


def _decoded(message: Any) -> tuple[Any, str | None]:
    """The body as the task will get it (kombu refuses content types not accepted)."""
    try:
        return message.payload, None
    except ContentDisallowed:
        return None, f"content type {message.content_type!r} is not accepted (JSON only)"
    except Exception as exc:
        return None, f"the body cannot be decoded as {message.content_type!r}: {exc}"


def _time_limits_ok(value: Any) -> bool:
    if value is None:
        return True
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(
            v is None
            or (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))
            for v in value
        )
    )


def _shape(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(type(v).__name__ for v in value[:4]) + "]"
    return type(value).__name__


class Refusals:
    """Dead-letters the messages a consumer refuses, acking each once its row is committed.

    `call_after(seconds, fn, args)` schedules a retry on the consumer's own timer, so the
    message is acked from the thread that consumes it.
    """

    def __init__(self, database_url: str, call_after: Callable[..., Any]) -> None:
        self._url = database_url
        self._call_after = call_after
        self._engine: Engine | None = None

    def refuse(self, message: Any, reason: str) -> None:
        """Dead-letter `message` for `reason`, then ack it."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        if REFUSED in headers:  # the transport's envelope: its body is the original message
            raw, size = _bytes(message.body), headers.get(REFUSED_SIZE)
            known = isinstance(size, int) and not isinstance(size, bool) and size >= len(raw)
            body = deadletter.raw_body(raw, size=size if known else None)
        else:
            body = {
                **deadletter.raw_body(_bytes(message.body)),
                "content_type": deadletter.storable(message.content_type),
                "headers": deadletter.storable(headers),
            }
        task, task_id = headers.get("task"), headers.get("id")
        row = {
            "task": task if isinstance(task, str) else None,
            "message_id": task_id if isinstance(task_id, str) else None,
            "body": body,
            "reason": reason,
        }
        self._store(message, row, 1)

    def _store(self, message: Any, row: dict[str, Any], attempt: int) -> None:
        try:
            deadletter.record(self.engine, **row)
        except DatabaseUnavailable as exc:
            delay = backoff_s(STORE_BACKOFF, attempt)
            log.warning(
                "message.dead_letter_deferred",
                message_id=row["message_id"],
                reason=str(exc),
                retry_in_s=round(delay, 1),
            )
            self._call_after(delay, self._store, (message, row, attempt + 1))
            return
        except Exception as exc:  # not the database's absence: retrying would not help
            log.error("message.dead_letter_failed", message_id=row["message_id"], error=str(exc))
        finally:
            self._release()
        try:
            message.ack()
        except Exception as exc:  # a lost channel: the broker delivers it again
            log.warning("message.ack_failed", message_id=row["message_id"], reason=str(exc))

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_db_engine(self._url, null_pool=True)
        return self._engine

    def _release(self) -> None:
        # No connection outlives a write: the consumer's process forks pool children later.
        if self._engine is not None:
            self._engine.dispose()

    def close(self) -> None:
        self._release()
        self._engine = None


def _bytes(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if body is None:
        return b""
    return str(body).encode("utf-8", "surrogatepass")
