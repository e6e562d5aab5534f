"""Validated inputs to the use cases: what a caller may ask for, with precise errors."""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from domain import storable
from domain.callbacks.urls import undeliverable
from domain.errors import InvalidInput
from domain.runs.states import TRIGGERS

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]*$"
MAX_PARAMS_BYTES = 1_000_000
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(
    value: str | float | int | timedelta, *, field: str = "delay", bare_seconds: bool = True
) -> timedelta:
    """`30s`, `15m`, `2h`, `1d`, `250ms` (or a number of seconds) → timedelta; negative,
    malformed or longer than a century → InvalidInput. `bare_seconds=False`: text must carry
    its unit (`--delay 10` is refused: 10 what?); stored schedule intervals may omit it."""
    if isinstance(value, bool):
        raise InvalidInput(f"{field}: {storable.NOT_BOOL}", field=field)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if not match:
            raise InvalidInput(
                f"{field}: {value!r} is not a duration; expected e.g. 30s, 15m, 2h, 1d",
                field=field,
            )
        number, unit = match.group(1), match.group(2)
        if unit is None and not bare_seconds and float(number) != 0:  # 0 needs no unit
            raise InvalidInput(f"{field}: {number} what? use {number}s, {number}m", field=field)
        seconds = float(number) * _UNIT_S[unit]
    if not math.isfinite(seconds) or seconds > storable.MAX_SECONDS:
        raise InvalidInput(
            f"{field}: {value!r} is too long; the most is 100 years ({storable.MAX_SECONDS}s)",
            field=field,
        )
    if seconds < 0:
        raise InvalidInput(f"{field}: must not be negative (got {value!r})", field=field)
    return timedelta(seconds=seconds)


def _plain_number(value: Any) -> Any:
    # JSON's true is not 1 (pydantic's lax mode reads `priority: true` as 1), and infinity is
    # not a bound that happens to be too large: both are refused before the range checks.
    if isinstance(value, bool):
        raise ValueError(storable.NOT_BOOL)
    text = value.strip().lower().lstrip("+-") if isinstance(value, str) else None
    if text in _NOT_FINITE or (isinstance(value, float | Decimal) and not math.isfinite(value)):
        raise ValueError("expected a finite number")
    return value


_NOT_FINITE = {"inf", "infinity", "nan", "snan"}
_NUMBER = BeforeValidator(_plain_number)
#: Number fields as every producer and the API document them: booleans, infinities and
#: values beyond their column (or datetime's range, once added to now) are refused.
Priority = Annotated[int, _NUMBER, Field(ge=0, le=9)]
Attempts = Annotated[int, _NUMBER, Field(ge=1, le=100)]
Count = Annotated[int, _NUMBER, Field(gt=0, le=storable.INT32_MAX)]
Delay = Annotated[float, _NUMBER, Field(ge=0, le=storable.MAX_SECONDS, allow_inf_nan=False)]
Seconds = Annotated[float, _NUMBER, Field(gt=0, le=storable.MAX_SECONDS, allow_inf_nan=False)]
Minutes = Annotated[float, _NUMBER, Field(gt=0, le=storable.MAX_SECONDS // 60, allow_inf_nan=False)]
Slots = Annotated[int, _NUMBER, Field(ge=1, le=10_000)]
Usd = Annotated[
    Decimal,
    _NUMBER,
    Field(gt=0, lt=storable.MAX_USD, decimal_places=10, allow_inf_nan=False),
]


class EnqueueRequest(BaseModel):
    """One run to create. Unknown fields are refused, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    params: dict[str, Any] = Field(default_factory=dict)
    project: str = Field("default", min_length=1, max_length=100, pattern=NAME_PATTERN)
    queue: str | None = Field(None, min_length=1, max_length=100, pattern=NAME_PATTERN)
    priority: Priority | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)
    delay_s: Delay | None = None
    not_before: datetime | None = None
    max_attempts: Attempts | None = None
    timeout_s: Seconds | None = None
    budget_usd: Usd | None = None
    max_requests: Count | None = None
    max_minutes: Minutes | None = None
    kind: Literal["task", "pipeline"] = "task"
    triggered_by: str = "client"
    trigger_ref: str | None = Field(None, max_length=255)
    parent_run_id: uuid.UUID | None = None
    callback_url: str | None = None
    #: At most concurrency_max runs with this key at once (domain/flow/concurrency.py); a
    #: task's own Limit gives both unless told here.
    concurrency_key: str | None = Field(None, min_length=1, max_length=200)
    concurrency_max: Slots | None = None

    @field_validator("params", mode="before")
    @classmethod
    def _params_object(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"must be a JSON object, got {type(value).__name__}")
        storable.refuse_unstorable(value, "params")
        try:
            encoded = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON-serialisable: {exc}") from None
        if len(encoded) > MAX_PARAMS_BYTES:
            raise ValueError(f"is {len(encoded)} bytes encoded; the limit is {MAX_PARAMS_BYTES}")
        return value

    @field_validator("idempotency_key", "trigger_ref", "callback_url", "concurrency_key")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return storable.refuse_unstorable(value, "text")

    @field_validator("callback_url")
    @classmethod
    def _deliverable(cls, value: str | None) -> str | None:
        problem = None if value is None else undeliverable(value)
        if problem:
            raise ValueError(f"{problem}; callbacks are POSTed to it when the run ends")
        return value

    @field_validator("not_before")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone (e.g. 2026-01-31T12:00:00Z)")
        return storable.as_utc(value) if value is not None else None

    @field_validator("triggered_by")
    @classmethod
    def _trigger(cls, value: str) -> str:
        if value not in TRIGGERS:
            raise ValueError(f"must be one of {', '.join(TRIGGERS)}")
        return value

    @model_validator(mode="after")
    def _one_time(self) -> EnqueueRequest:
        if self.delay_s is not None and self.not_before is not None:
            raise ValueError("give either delay or not_before, not both")
        return self

    def due_at(self, now: datetime) -> datetime:
        if self.not_before is not None:
            return self.not_before
        return now + timedelta(seconds=self.delay_s or 0)


def build_request(**fields: Any) -> EnqueueRequest:
    """EnqueueRequest from loose input; the first problem is an InvalidInput naming its field."""
    try:
        return EnqueueRequest(**fields)
    except ValidationError as exc:
        raise invalid_from(exc) from None


_BATCH = TypeAdapter(list[EnqueueRequest])


def build_requests(items: list[dict[str, Any]]) -> list[EnqueueRequest]:
    """Many EnqueueRequests validated in one pass (pydantic's loop, not ours); the first
    problem is an InvalidInput naming the item and its field: `items[3].priority: ...`."""
    try:
        return _BATCH.validate_python(items)
    except ValidationError as exc:
        index = exc.errors()[0]["loc"][0]
        raise invalid_from(exc, prefix=f"items[{index}].", skip=1) from None


def invalid_from(exc: ValidationError, *, prefix: str = "", skip: int = 0) -> InvalidInput:
    """Translate pydantic's first error into an InvalidInput that names the field."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"][skip:]) or None
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    elif "input" in err and err["type"] not in {"missing"}:
        given = err["input"]
        shown = repr(given.isoformat() if isinstance(given, datetime) else given)
        if len(shown) <= 80:
            message = f"{message} (got {shown})"
    where = f"{prefix}{field}" if field else prefix.rstrip(".") or "input"
    return InvalidInput(f"{where}: {message}", field=field)
