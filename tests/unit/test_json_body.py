"""The read endpoints' orjson responses say exactly what the views' to_dict() says."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from api.json_body import JSONBody
from domain.runs.views import _RUN_FIELDS, LogLine, RunView


def run(**changes: Any) -> RunView:
    now = datetime(2026, 11, 24, 16, 45, 1, 250_000, tzinfo=UTC)
    values: dict[str, Any] = dict.fromkeys(_RUN_FIELDS)
    values.update(
        id=uuid.uuid4(), project="default", kind="task", name="report", queue="default",
        priority=5, params={"rows": [1, 2.5, "x"], "nested": {"ok": True}}, status="succeeded",
        attempt=1, max_attempts=3, triggered_by="api", not_before=now, dispatch_attempts=1,
        cost_usd=Decimal("0.0012340000"), budget_usd=Decimal("5"), tokens_in=10, tokens_out=2,
        requests_made=1, result={"n": 3}, created_at=now, started_at=now,
        finished_at=datetime(2026, 11, 24, 16, 45, 2, tzinfo=UTC), parent_run_id=uuid.uuid4(),
    )  # fmt: skip
    values.update(changes)
    return RunView(**values)


def decoded(content: Any) -> Any:
    return json.loads(JSONBody(content).body)


def test_a_page_of_views_encodes_as_their_to_dict() -> None:
    page = [run(), run(status="failed", error="boom", error_type="ValueError", result=None)]
    assert decoded({"items": page, "next_cursor": None}) == {
        "items": [view.to_dict() for view in page],
        "next_cursor": None,
    }


def test_log_lines_encode_as_their_to_dict() -> None:
    line = LogLine(7, 2, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "log", "info", "héllo", None)
    assert decoded({"items": [line]}) == {"items": [line.to_dict()]}


def test_integers_beyond_64_bits_fall_back_to_the_standard_encoder() -> None:
    view = run(params={"big": 2**70}, result={"neg": -(2**80)})
    body = decoded({"items": [view], "next_cursor": "c"})
    assert body == {"items": [view.to_dict()], "next_cursor": "c"}
    assert body["items"][0]["params"]["big"] == 2**70


def test_a_page_that_needs_the_fallback_still_encodes_non_finite_floats_as_null() -> None:
    # Both at once: the big integer sends it to the standard library, which refuses infinity.
    view = run(params={"big": 2**70}, timeout_s=float("inf"), result={"x": float("nan")})
    body = decoded({"items": [view], "next_cursor": None})
    item = body["items"][0]
    assert (item["params"], item["timeout_s"], item["result"]) == (
        {"big": 2**70},
        None,
        {"x": None},
    )
    assert item["id"] == str(view.id) and item["cost_usd"] == "0.0012340000"
