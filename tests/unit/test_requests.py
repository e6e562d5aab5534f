"""Enqueue input: every kind of bad input gets a message naming its field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.cli.params import parse_params
from domain.errors import InvalidInput
from domain.runs.requests import build_request, build_requests, parse_duration


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"params": [1, 2]}, "params", "must be a JSON object, got list"),
        ({"params": "x=1"}, "params", "must be a JSON object, got str"),
        ({"params": {"when": datetime.now(UTC)}}, "params", "JSON-serialisable"),
        ({"params": {"x": float("nan")}}, "params", "finite number at params.x"),
        ({"params": {"n": 2**63}}, "params", "64 bits: -2^63 to 2^63-1) at params.n"),
        (
            {"params": {"a": [1, {"s": "a\x00b"}]}},
            "params",
            "NUL (\\u0000) characters at params.a[1].s",
        ),
        ({"params": {"k\x00": 1}}, "params", "keys must not contain NUL"),
        ({"idempotency_key": "a\x00b"}, "idempotency_key", "must not contain NUL"),
        ({"priority": True}, "priority", "expected a number, not true/false"),
        ({"max_attempts": False}, "max_attempts", "not true/false"),
        ({"timeout_s": True}, "timeout_s", "not true/false"),
        ({"timeout_s": float("inf")}, "timeout_s", "expected a finite number (got inf)"),
        ({"timeout_s": "-Infinity"}, "timeout_s", "expected a finite number"),
        ({"timeout_s": 1e300}, "timeout_s", "less than or equal to 3153600000"),
        ({"timeout_s": float("nan")}, "timeout_s", "finite number"),
        ({"delay_s": 1e10}, "delay_s", "less than or equal to 3153600000"),
        ({"max_minutes": 1e300}, "max_minutes", "less than or equal to 52560000"),
        ({"max_requests": 2**31}, "max_requests", "less than or equal to 2147483647"),
        ({"budget_usd": "1e10"}, "budget_usd", "less than"),
        ({"budget_usd": "NaN"}, "budget_usd", "finite number"),
        (
            {"not_before": datetime.fromisoformat("0001-01-01T00:00:00+14:00")},
            "not_before",
            "outside the years 1 to 9999 once converted to UTC (got '0001-01-01T00:00:00+14:00')",
        ),
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
        ("30", 30),  # stored schedule intervals (pipeline.json's seconds) carry no unit
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


def test_a_duration_from_a_person_needs_its_unit() -> None:
    with pytest.raises(InvalidInput, match=r"^every: 10 what\? use 10s, 10m$"):
        parse_duration("10", field="every", bare_seconds=False)
    assert parse_duration(10, bare_seconds=False).total_seconds() == 10  # a number is seconds
    assert parse_duration("0", bare_seconds=False).total_seconds() == 0  # zero of anything


@pytest.mark.parametrize("text", ["99999999999d", "100000000000000000000d", "36501d"])
def test_durations_beyond_a_century_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"^delay: .* is too long; the most is 100 years"):
        parse_duration(text)


STORABLE_TEXT = st.text(st.characters(blacklist_characters="\x00"), max_size=20)
INT64 = st.integers(-(2**63), 2**63 - 1)


@given(
    st.dictionaries(
        STORABLE_TEXT, INT64 | STORABLE_TEXT | st.floats(allow_nan=False, allow_infinity=False)
    )
)
def test_any_storable_json_object_is_accepted_unchanged(params: dict[str, Any]) -> None:
    assert build_request(name="x", params=params).params == params


@given(
    st.integers(min_value=2**63)
    | st.integers(max_value=-(2**63) - 1)
    | st.sampled_from([float("inf"), float("-inf"), float("nan")])
    | STORABLE_TEXT.map(lambda t: t + "\x00"),
    st.lists(st.sampled_from(["a", 0]), max_size=3),
)
def test_an_unstorable_value_anywhere_in_params_is_refused_with_its_path(
    bad: Any, path: list[str | int]
) -> None:
    params: Any = bad
    for step in reversed(path):
        params = {step: params} if isinstance(step, str) else [params]
    with pytest.raises(InvalidInput) as info:
        build_request(name="x", params={"top": params})
    assert info.value.field == "params"
    where = "params.top" + "".join(f".{s}" if isinstance(s, str) else "[0]" for s in path)
    assert f" at {where}" in str(info.value)


@given(st.floats(allow_nan=False) | st.integers())
def test_numbers_at_the_edges_are_accepted_only_within_their_columns(value: float) -> None:
    for field, low, high in [
        ("timeout_s", 0, 3_153_600_000),
        ("delay_s", 0, 3_153_600_000),
        ("max_requests", 0, 2**31 - 1),
        ("priority", 0, 9),
    ]:
        fits = (low < value <= high) if field != "delay_s" else (low <= value <= high)
        if field in {"max_requests", "priority"}:
            fits = fits or (field == "priority" and value == 0)
            fits = fits and float(value).is_integer()
        try:
            request = build_request(name="x", **{field: value})
        except InvalidInput as exc:
            assert not fits, f"{field}={value!r} refused: {exc}"
            assert exc.field == field
        else:
            assert fits, f"{field}={value!r} accepted"
            assert request.due_at(datetime(2026, 1, 1, tzinfo=UTC)).year < 2200


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


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"params": {"n": 2**70}}, "params", "integer out of range"),
        ({"params": {"s": "a\x00"}}, "params", "NUL (\\u0000) characters at params.s"),
        ({"queue": "q\x00"}, "queue", "must not contain NUL"),
        ({"priority": True}, "priority", "not true/false"),
    ],
)
def test_a_schedule_refuses_what_each_of_its_runs_would_be_refused(
    fields: dict[str, Any], field: str, fragment: str
) -> None:
    from domain.schedules.definitions import ScheduleInput

    with pytest.raises(InvalidInput) as info:
        ScheduleInput.parse(name="s", target="t", trigger="interval", expression="1m", **fields)
    assert info.value.field == field and fragment in str(info.value)
