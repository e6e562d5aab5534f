"""Live logs over Server-Sent Events: follow a run until it ends and every line is sent."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import structlog
from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.auth import Reader
from api.state import ApiState, State
from domain.errors import ConveyorError
from domain.runs import control
from domain.runs import reads as queries
from domain.runs.views import LogLine

log = structlog.get_logger("conveyor.api.sse")

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])

BATCH = 500


def event(kind: str, data: object, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


def log_events(lines: list[LogLine]) -> str:
    return "".join(event("log", line.to_dict(), line.seq) for line in lines)


def _poll(state: ApiState, run_id: uuid.UUID, after_seq: int) -> queries.Tail:
    return queries.tail(state.reader(), run_id, after_seq=after_seq, limit=BATCH)


async def follow(state: ApiState, run_id: uuid.UUID, after_seq: int) -> AsyncIterator[str]:
    """Poll the run every `sse_poll_s` and send new lines; end with an `end` event once the
    run is terminal and its last lines are out. A client that goes away cancels the await
    this generator is parked on, so the `finally` always runs (the gauge shows leaks)."""
    options = state.options
    streams = state.metrics.sse_streams
    streams.inc()
    seq = after_seq
    try:
        yield "retry: 2000\n\n"
        quiet_since = time.monotonic()
        while True:
            try:
                tail = await anyio.to_thread.run_sync(_poll, state, run_id, seq)
            except ConveyorError as exc:
                # Headers are sent already: the error travels as an event, then the stream ends.
                yield event("error", {"type": type(exc).__name__, "message": str(exc)})
                return
            if tail.lines:
                yield log_events(tail.lines)
                seq = tail.lines[-1].seq
                quiet_since = time.monotonic()
                if len(tail.lines) == BATCH:
                    continue  # more are waiting: no pause
            if tail.finished:
                yield event("end", {"status": tail.status, "last_seq": seq})
                return
            if time.monotonic() - quiet_since >= options.sse_keepalive_s:
                yield ": keepalive\n\n"
                quiet_since = time.monotonic()
            await anyio.sleep(options.sse_poll_s)
    finally:
        streams.dec()
        log.debug("sse.closed", run_id=str(run_id), last_seq=seq)


@router.get(
    "/{run_id}/logs/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_logs(
    state: State,
    _: Reader,
    run_id: uuid.UUID,
    after_seq: Annotated[int, Query(ge=0, le=2**62)] = 0,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> StreamingResponse:
    """`text/event-stream` of `log` events (id = seq), ending with an `end` event that carries
    the final status. A reconnecting EventSource resumes after its Last-Event-ID."""
    if last_event_id and last_event_id.isdigit():
        after_seq = max(after_seq, int(last_event_id))
    # 404 now, while a status code can still be sent.
    await run_in_threadpool(control.get_run, state.reader(), run_id)
    return StreamingResponse(
        follow(state, run_id, after_seq),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
