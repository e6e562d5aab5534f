"""JSON responses for the read endpoints, encoded by orjson.

orjson writes the read side's dataclass views (RunView, LogLine, StepView), UUIDs and
datetimes itself, the same JSON `to_dict()` gives, so a page of runs needs no intermediate
dicts; money (Decimal) becomes a decimal string, as everywhere in the API. A value orjson
refuses (an integer beyond 64 bits inside a run's params or result) falls back to the
standard library, which writes any integer; a float that is not finite (which no JSON
can hold) is written as null there too, as orjson writes it, so a page never fails to encode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from fastapi.responses import JSONResponse


class JSONBody(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content, default=_money)
        except orjson.JSONEncodeError:
            return json.dumps(
                _tree(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")
            ).encode("utf-8")


def _money(value: Any) -> str:
    if type(value) is Decimal:
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _tree(value: Any) -> Any:
    """`value` as plain dicts, lists and scalars, non-finite floats as None (the slow path)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_tree(item) for item in value]
    if value is None or isinstance(value, str | int):
        return value
    return _tree(_plain(value))


def _plain(value: Any) -> Any:
    """What orjson writes natively, as what the standard library's encoder writes."""
    to_dict = getattr(value, "to_dict", None)
    if to_dict is not None:
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
