"""Run ids sort by creation time; cursors round-trip and refuse tampering."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.clock import uuid7, uuid7_many
from domain.errors import InvalidInput
from domain.runs.repository import RunFilter, decode_cursor, encode_cursor


def test_uuid7_is_version_7_and_time_ordered() -> None:
    ids = []
    for _ in range(5):
        ids.append(uuid7())
        # ids minted in later milliseconds sort later
        deadline = datetime.now(UTC) + timedelta(milliseconds=2)
        while datetime.now(UTC) < deadline:
            pass
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids)
    assert len({uuid7() for _ in range(10_000)}) == 10_000


def test_uuid7_many_continues_the_same_strictly_increasing_sequence() -> None:
    before = uuid7()
    batch = uuid7_many(5000)  # far more than one millisecond's worth of ties
    after = uuid7()
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in batch)
    assert [before, *batch, after] == sorted({before, *batch, after})
    assert len(set(batch)) == 5000
    # The first 48 bits are the Unix time in ms (a tie increments the random part, not time).
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    assert 0 <= now_ms - (batch[0].int >> 80) < 5000


@given(
    st.datetimes(timezones=st.just(UTC), min_value=datetime(2000, 1, 1)),
    st.uuids(),
)
def test_cursor_round_trip(created: datetime, run_id: uuid.UUID) -> None:
    assert decode_cursor(encode_cursor(created, run_id)) == (created, run_id)


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "abc",
        "!!!!",
        # fixed values: every pytest-xdist worker must collect the same test ids
        encode_cursor(
            datetime(2026, 1, 1, tzinfo=UTC), uuid.UUID("01900000-0000-7000-8000-000000000000")
        )[:-3]
        + "zzz",
        "MjAyNi0wMS0wMXxub3QtYS11dWlk",
    ],
)
def test_tampered_cursor_is_invalid_input(cursor: str) -> None:
    with pytest.raises(InvalidInput, match="cursor: not a cursor this server issued"):
        decode_cursor(cursor)


def test_unknown_status_filter_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidInput) as info:
        RunFilter(status=["pending", "finished"])
    assert info.value.field == "status"
    assert "'finished'" in str(info.value) and "succeeded" in str(info.value)
