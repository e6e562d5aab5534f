"""Read-side values handed to callers (CLI, API, Client): plain, immutable, JSON-friendly."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import RowMapping


@dataclass(slots=True)
class RunView:
    """A run as callers see it. Treat it as read-only; it is a snapshot, not a live row.

    (Not a frozen dataclass: freezing costs a setattr call per field, and enqueue_many builds
    thousands of these per second.)
    """

    id: uuid.UUID
    project: str
    kind: str
    name: str
    queue: str
    priority: int
    params: dict[str, Any]
    status: str
    attempt: int
    max_attempts: int
    idempotency_key: str | None
    triggered_by: str
    trigger_ref: str | None
    not_before: datetime
    dispatched_at: datetime | None
    dispatch_attempts: int
    timeout_s: float | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    cancel_requested_at: datetime | None
    budget_usd: Decimal | None
    max_requests: int | None
    max_minutes: float | None
    cost_usd: Decimal
    tokens_in: int
    tokens_out: int
    requests_made: int
    result: Any
    error_type: str | None
    error: str | None
    exit_code: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    parent_run_id: uuid.UUID | None
    callback_url: str | None
    #: While `waiting`: what for (`sleep`, `concurrency:<key>`); the wake time is `not_before`.
    wait_reason: str | None = None
    #: At most concurrency_max runs with this key run at once (domain/flow/concurrency.py).
    concurrency_key: str | None = None
    concurrency_max: int | None = None
    #: The rate limit it takes one request of as it starts (domain/flow/rates.py).
    rate_limit: str | None = None
    #: Created while its queue was busy: published in its project's turn (domain/flow/fair.py).
    paced: bool = False

    @classmethod
    def from_row(cls, row: RowMapping) -> RunView:
        return cls(**{name: row[name] for name in _RUN_FIELDS})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The field names, in order: a query selecting these columns in this order can build
        views positionally, `RunView(*row)`, without a mapping per row."""
        return _RUN_FIELDS

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: UUIDs and datetimes as strings, money as a decimal string."""
        return _plain(self, _RUN_FIELDS)

    def waits_for(self) -> str | None:
        """What the run waits for, in words (None: it waits for nothing but a worker)."""
        reason = self.wait_reason
        if self.status == "pending" and self.paced and self.dispatched_at is None:
            return f"its project's turn in the busy queue {self.queue!r} (fair share)"
        if self.status not in ("waiting", "running") or not reason:
            return None
        kind, _, what = reason.partition(":")
        until = f", next look {self.not_before:%H:%M:%S} UTC" if self.status == "waiting" else ""
        described = {
            "rate": f"room in the rate limit {what!r}{until}",
            "concurrency": f"a free slot of the concurrency key {what!r}",
            "signal": f"the signal {what!r}",
            "sleep": f"the end of its sleep at {self.not_before:%H:%M:%S} UTC",
            "children": "its children to end",
        }
        return described.get(kind, reason)


_RUN_FIELDS = tuple(f.name for f in fields(RunView))


@dataclass(frozen=True, slots=True)
class LogLine:
    seq: int
    attempt: int
    ts: datetime
    stream: str
    level: str
    message: str
    fields: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return _plain(self, _LOG_FIELDS)


_LOG_FIELDS = tuple(f.name for f in fields(LogLine))


@dataclass(frozen=True, slots=True)
class StepView:
    seq: int
    attempt: int
    name: str
    step_type: str
    status: str
    detail: str | None
    started_at: datetime | None
    finished_at: datetime | None
    #: A checkpointed step's n-th occurrence of its name in the run (None: a visible step).
    occurrence: int | None = None
    tries: int = 1
    #: What the cost entries recorded inside the step add up to.
    cost_usd: Decimal = Decimal(0)

    def replayed(self, run_attempt: int) -> bool:
        """Completed by an earlier attempt than the run's current one, which returned its
        stored result instead of running it."""
        return (
            self.occurrence is not None
            and self.status == "completed"
            and (self.attempt < run_attempt)
        )

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        return _plain(self, _STEP_FIELDS)


_STEP_FIELDS = tuple(f.name for f in fields(StepView))


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a keyset-paginated listing; `next_cursor` is None on the last page."""

    items: list[RunView]
    next_cursor: str | None


_AS_IS = frozenset({str, int, float, bool, type(None), dict, list})
_CONVERT: dict[type, Any] = {uuid.UUID: str, datetime: datetime.isoformat, Decimal: str}


def _plain(view: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """A view's fields, JSON-ready. Field by field rather than dataclasses.asdict, which
    deep-copies every params, result and fields dict on the way (most of a list page's cost);
    the values are the caller's to read, not to change. Dispatched on the exact type: most
    fields are plain values, and three isinstance checks each were the rest of that cost."""
    out = {}
    for name in names:
        value = getattr(view, name)
        kind = type(value)
        if kind not in _AS_IS:
            convert = _CONVERT.get(kind)
            value = convert(value) if convert is not None else jsonable(value)
        out[name] = value
    return out


def jsonable_fields(value: Any) -> dict[str, Any]:
    """A dataclass view's fields as JSON values (ids and times as text, money exact)."""
    return {key: jsonable(item) for key, item in asdict(value).items()}


def jsonable(value: Any) -> Any:
    """One value as JSON takes it: a UUID or Decimal as text, a time in ISO 8601."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value
