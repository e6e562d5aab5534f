"""Enqueue input: every kind of bad input gets a message naming its field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.cli.params import parse_params
from domain.errors import InvalidInput
from domain.requests import build_request, build_requests, parse_duration


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"params": [1, 2]}, "params", "must be a JSON object, got list"),
        ({"params": "x=1"}, "params", "must be a JSON object, got str"),
        ({"params": {"when": datetime.now(UTC)}}, "params", "JSON-serialisable"),
        ({"params": {"x": float("nan")}}, "params", "JSON-serialisable"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"priority": 10}, "priority", "less than or equal to 9"),
        ({"priority": -1}, "priority", "greater than or equal to 0"),
        ({"delay_s": -1}, "delay_s", "greater than or equal to 0"),
        ({"idempotency_key": "k" * 256}, "idempotency_key", "at most 255"),
        ({"idempotency_key": ""}, "idempotency_key", "at least 1"),
        ({"max_attempts": 0}, "max_attempts", "greater than or equal to 1"),
        ({"budget_usd": "-1"}, "budget_usd", "greater than 0"),
        ({"name": "has space"}, "name", "should match pattern"),
        ({"name": ""}, "name", "at least 1"),
        ({"project": "a/b"}, "project", "should match pattern"),
        ({"not_before": datetime(2030, 1, 1)}, "not_before", "time zone"),
        ({"triggered_by": "carrier-pigeon"}, "triggered_by", "must be one of"),
    ],
)
def test_bad_input_names_the_field(fields: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        build_request(**{"name": "hello", **fields})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")
    assert fragment in str(info.value)


def test_delay_and_not_before_are_exclusive() -> None:
    with pytest.raises(InvalidInput, match="either delay or not_before"):
        build_request(name="x", delay_s=5, not_before=datetime(2030, 1, 1, tzinfo=UTC))


def test_due_time_from_delay() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert build_request(name="x", delay_s=90).due_at(now) == now + timedelta(seconds=90)
    assert build_request(name="x").due_at(now) == now


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30),
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("250ms", 0.25),
        (" 1.5m ", 90),
        (0, 0),
        (2.5, 2.5),
    ],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["soon", "5 minutes", "1w", "", "s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidInput, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", ["-5s", -1, timedelta(seconds=-1)])
def test_negative_delay_is_refused(value: Any) -> None:
    with pytest.raises(InvalidInput, match="must not be negative"):
        parse_duration(value)


def test_cli_params_keep_json_types_and_merge_over_json() -> None:
    params = parse_params(["n=7", "ok=true", "name=world", "eq=a=b"], '{"n": 1, "keep": [1]}')
    assert params == {"n": 7, "ok": True, "name": "world", "eq": "a=b", "keep": [1]}


@pytest.mark.parametrize(
    ("pairs", "raw", "fragment"),
    [
        ([], "{bad", "not valid JSON"),
        ([], "[1]", "must be a JSON object"),
        (["novalue"], None, "expected key=value"),
        (["=1"], None, "expected key=value"),
    ],
)
def test_cli_params_errors(pairs: list[str], raw: str | None, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        parse_params(pairs, raw)


@given(st.dictionaries(st.text(min_size=1, max_size=10), st.integers() | st.text(max_size=20)))
def test_any_json_object_is_accepted_unchanged(params: dict[str, Any]) -> None:
    assert build_request(name="x", params=params).params == params


def test_a_batch_is_validated_in_one_pass_and_an_error_names_the_item() -> None:
    items = [{"name": "a", "params": {"i": i}} for i in range(5)]
    requests = build_requests(items)
    assert [r.params["i"] for r in requests] == [0, 1, 2, 3, 4]
    assert all(r.project == "default" for r in requests)
    items[3]["priority"] = 12
    with pytest.raises(InvalidInput) as bad:
        build_requests(items)
    assert str(bad.value).startswith("items[3].priority: Input should be less than or equal to 9")
    assert bad.value.field == "priority"
    with pytest.raises(InvalidInput, match=r"^items\[1\]\.params: must be a JSON object"):
        build_requests([{"name": "a"}, {"name": "b", "params": [1]}])
