"""Structured events a pipeline prints on stdout: the SDK without importing conveyor.

One event per line, the prefix `::conveyor::` followed by a JSON object with an `event` key:

    ::conveyor::{"event": "step", "name": "load"}                 start a step (ends the open one)
    ::conveyor::{"event": "step_end", "status": "failed", "detail": "no rows"}
    ::conveyor::{"event": "metric", "name": "rows", "value": 120, "labels": {"table": "orders"}}
    ::conveyor::{"event": "cost", "provider": "openai", "model": "gpt-4o-mini",
                 "tokens_in": 900, "tokens_out": 80, "usd": "0.00019", "requests": 1}
    ::conveyor::{"event": "log", "message": "fetched", "level": "warning", "fields": {"n": 3}}
    ::conveyor::{"event": "result", "value": {"rows": 120}}          the run's JSON result

A step still open when the process ends is completed if it exited 0, failed otherwise. A line
that starts with the prefix but is not a valid event is stored as it is, with a warning.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any

from worker.context import TaskContext
from worker.masked_sink import LineSink

EVENT_PREFIX = "::conveyor::"
_LEVELS = {"debug", "info", "warning", "error", "critical"}
_UNSET: Any = object()


class PipelineStepFailed(Exception):
    """The pipeline marked its step as failed."""


class EventHandler:
    """Applies a run's events to its context (steps, costs) and writer (logs, metrics)."""

    def __init__(self, ctx: TaskContext, sink: LineSink) -> None:
        self.ctx = ctx
        self.sink = sink
        self._step: AbstractContextManager[None] | None = None
        self._step_name = ""
        self.result: Any = _UNSET
        self.count = 0

    @property
    def has_result(self) -> bool:
        return self.result is not _UNSET

    def handle(self, line: str) -> None:
        """`line` is the text after the prefix (already masked)."""
        try:
            # Decoding can turn escapes back into a secret: mask before any value is cut short.
            payload = self.ctx.masker.data(json.loads(line))
            if not isinstance(payload, dict) or not isinstance(payload.get("event"), str):
                raise ValueError('expected a JSON object with an "event" key')
            kind = payload["event"]
            handler = getattr(self, f"_on_{kind}", None)
            if handler is None:
                raise ValueError(
                    f"unknown event {kind!r} (step, step_end, metric, cost, log, result)"
                )
            handler(payload)
            self.count += 1
        except Exception as exc:
            self._log(
                f"{EVENT_PREFIX}{line}",
                stream="stdout",
                level="warning",
                fields={"event_ignored": f"{type(exc).__name__}: {exc}"[:500]},
            )

    def close(self, *, succeeded: bool) -> None:
        """End a step the pipeline left open."""
        if self._step is not None:
            self._end_step("completed" if succeeded else "failed", "the process ended")

    # -- events ------------------------------------------------------------------------------
    def _on_step(self, payload: dict[str, Any]) -> None:
        name = _text(payload, "name", required=True)
        step_type = _text(payload, "type") or "step"
        if self._step is not None:
            self._end_step("completed", None)
        step = self.ctx.step(name[:200], step_type=step_type[:50])
        step.__enter__()
        self._step, self._step_name = step, name
        self._event(f"step {name} started", payload)

    def _on_step_end(self, payload: dict[str, Any]) -> None:
        status = _text(payload, "status") or "completed"
        if status not in {"completed", "failed"}:
            raise ValueError('"status" must be "completed" or "failed"')
        if self._step is None:
            raise ValueError("no step is running")
        self._event(f"step {self._step_name} {status}", payload)
        self._end_step(status, _text(payload, "detail"))

    def _on_metric(self, payload: dict[str, Any]) -> None:
        name = _text(payload, "name", required=True)
        value = payload.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError('"value" must be a number')
        labels = payload.get("labels")
        if labels is not None and not isinstance(labels, dict):
            raise ValueError('"labels" must be an object')
        self.sink.metric(self.ctx.run_id, name[:200], float(value), labels or None)

    def _on_cost(self, payload: dict[str, Any]) -> None:
        usd = payload.get("usd")
        if usd is not None and not isinstance(usd, str | int | float):
            raise ValueError('"usd" must be a number or a decimal string')
        self._event(f"cost {payload.get('provider')}/{payload.get('model')}", payload)
        try:
            self.ctx.cost(
                provider=_text(payload, "provider", required=True),
                model=_text(payload, "model", required=True),
                tokens_in=_count(payload, "tokens_in"),
                tokens_out=_count(payload, "tokens_out"),
                usd=str(usd) if isinstance(usd, float) else usd,
                requests=_count(payload, "requests", 1),
            )
        except Exception as exc:
            if self.ctx.cancelled:  # over budget: the run is stopping; the process is killed
                return
            raise ValueError(str(exc)) from None

    def _on_log(self, payload: dict[str, Any]) -> None:
        level = _text(payload, "level") or "info"
        fields = payload.get("fields")
        if fields is not None and not isinstance(fields, dict):
            raise ValueError('"fields" must be an object')
        self._log(
            _text(payload, "message", required=True),
            stream="log",
            level=level if level in _LEVELS else "info",
            fields=fields,
        )

    def _on_result(self, payload: dict[str, Any]) -> None:
        if "value" not in payload:
            raise ValueError('"value" is missing')
        self.result = payload["value"]
        self._event("result", {"event": "result"})

    # -- helpers -----------------------------------------------------------------------------
    def _end_step(self, status: str, detail: str | None) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        if status == "completed":
            step.__exit__(None, None, None)
        else:
            error = PipelineStepFailed(detail or "the pipeline reported a failure")
            step.__exit__(PipelineStepFailed, error, None)

    def _event(self, message: str, payload: dict[str, Any]) -> None:
        self._log(message, stream="event", level="info", fields=payload)

    def _log(self, message: str, *, stream: str, level: str, fields: dict[str, Any] | None) -> None:
        self.sink.log(
            self.ctx.run_id, self.ctx.attempt, message, stream=stream, level=level, fields=fields
        )


def _text(payload: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = payload.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value:
        raise ValueError(f'"{key}" must be a non-empty string')
    return value


def _count(payload: dict[str, Any], key: str, default: int = 0) -> int:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'"{key}" must be a whole number >= 0')
    return value
