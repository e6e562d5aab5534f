"""What the database and JSON can hold: the one set of limits every producer (API, Client, CLI,
conveyor.submit) checks before anything is written, so a refusal names its field instead of
surfacing later as a driver error, an overflow or a response that cannot be encoded."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from domain.errors import InvalidInput

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Money columns are Numeric(20, 10): ten digits before the point.
MAX_USD = Decimal("1e10")
#: The longest delay, timeout or interval: a century, so any deadline computed from now stays
#: well inside datetime's range (year 9999) and every column that stores it.
MAX_SECONDS = 100 * 365 * 86400
NOT_BOOL = "expected a number, not true/false"
T = TypeVar("T")


def problem(value: Any) -> str | None:
    """Why this one value (not what it contains) cannot be stored, or None."""
    if isinstance(value, str) and "\x00" in value:
        return "text must not contain NUL (\\u0000) characters"
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            return "integer out of range (expected 64 bits: -2^63 to 2^63-1)"
    elif isinstance(value, float) and not math.isfinite(value):
        return "expected a finite number"
    return None


def first_problem(value: Any, where: str) -> tuple[str, str] | None:
    """(path, why) of the first value inside `value` that cannot be stored, or None: text
    with NUL characters (keys too), integers beyond 64 bits, numbers that are not finite."""
    todo: list[tuple[str, Any]] = [(where, value)]
    while todo:
        path, item = todo.pop()
        why = problem(item)
        if why is not None:
            return path, why
        if isinstance(item, Mapping):
            for key, inner in item.items():
                if isinstance(key, str) and "\x00" in key:
                    return path, "keys must not contain NUL (\\u0000) characters"
                todo.append((f"{path}.{key}", inner))
        elif isinstance(item, list | tuple):
            todo.extend((f"{path}[{i}]", inner) for i, inner in enumerate(item))
    return None


def refuse_unstorable(value: T, where: str) -> T:
    """`value` unchanged, or a ValueError saying what inside it cannot be stored (for pydantic
    validators: the field is named by pydantic, the path inside it by the message)."""
    found = first_problem(value, where)
    if found is not None:
        path, why = found
        raise ValueError(why if path == where else f"{why} at {path}")
    return value


def check_fields(fields: Mapping[str, Any]) -> None:
    """InvalidInput naming the first field (or the path inside it) no column can store."""
    for key, value in fields.items():
        found = first_problem(value, key)
        if found is not None:
            path, why = found
            raise InvalidInput(f"{path}: {why}", field=key)


def as_utc(value: datetime) -> datetime:
    """An aware datetime in UTC; ValueError when that moment is outside years 1 to 9999
    (`0001-01-01T00:00:00+14:00` is in year 0 in UTC)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is outside the years 1 to 9999 once converted to UTC") from None
