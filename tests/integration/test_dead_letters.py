"""Dead letters hold whatever a refused message carried: PostgreSQL refuses NUL characters and
lone surrogates in text and JSON, and names longer than their columns; a row is written anyway,
with those escaped or cut, and the bytes kept as base64."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import Engine, select

from domain.db.engine import create_db_engine
from domain.db.models import dead_letters
from domain.errors import DatabaseUnavailable
from worker.deadletter import MAX_RAW_BYTES, raw_body, record, storable

HOSTILE = "nul\x00 surrogate\ud800 end"


def stored(engine: Engine) -> dict[str, object]:
    with engine.connect() as conn:
        return dict(conn.execute(select(dead_letters)).mappings().one())


def test_a_dead_letter_of_hostile_text_is_stored_escaped(engine: Engine) -> None:
    record(
        engine,
        task="t" * 300 + HOSTILE,
        message_id=HOSTILE,
        body={**raw_body(HOSTILE.encode("utf-8", "surrogatepass")), "headers": storable(HOSTILE)},
        reason=f"reason with {HOSTILE}",
    )
    row = stored(engine)
    assert len(str(row["task"])) == 200
    assert row["message_id"] == "nul\\x00 surrogate\\ud800 end"
    assert row["reason"] == "reason with nul\\x00 surrogate\\ud800 end"
    body = row["body"]
    assert isinstance(body, dict)
    assert base64.b64decode(body["raw"]) == HOSTILE.encode("utf-8", "surrogatepass")
    assert body["headers"] == {"repr": ascii(HOSTILE)}


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ({"a": [1, "two", None]}, {"a": [1, "two", None]}),
        ({"n": 2**70}, {"n": 2**70}),  # JSONB holds any integer
        ({"x": float("nan")}, {"repr": "{'x': nan}"}),
        ({"s": "a\x00b"}, {"repr": "{'s': 'a\\x00b'}"}),
        ({"o": object}, {"o": "<class 'object'>"}),
    ],
)
def test_values_are_kept_as_json_where_a_json_column_can_hold_them(
    engine: Engine, value: object, kept: object
) -> None:
    record(engine, task="t", message_id=None, body=storable(value), reason="r")
    assert stored(engine)["body"] == kept


def test_the_bytes_are_bounded_and_the_size_kept() -> None:
    body = raw_body(b"x" * (MAX_RAW_BYTES + 10))
    assert (body["size"], body["truncated"]) == (MAX_RAW_BYTES + 10, True)
    assert base64.b64decode(body["raw"]) == b"x" * MAX_RAW_BYTES


def test_a_database_that_cannot_be_reached_is_transient() -> None:
    """The caller keeps the message and tries again: the error says so, without the password."""
    engine = create_db_engine("postgresql+psycopg://c:pw-secret@127.0.0.1:1/c", null_pool=True)
    with pytest.raises(DatabaseUnavailable) as info:
        record(engine, task="t", message_id=None, body=None, reason="r")
    assert "pw-secret" not in str(info.value)
    engine.dispose()
