"""Client.enqueue_many: a batch is validated as a whole before anything is written."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from conveyor import Client
from domain.db.models import runs
from domain.errors import InvalidInput
from domain.ports import OpenCatalog
from domain.settings import load_settings
from tests.fakes import FakePublisher


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(runs)).scalar_one())


def test_enqueue_many_writes_every_item_with_its_options(engine: Engine, db_url: str) -> None:
    publisher = FakePublisher()
    # OpenCatalog: any task name (the registry holds whatever other tests registered).
    client = Client(
        load_settings(database_url=db_url),
        engine=engine,
        publisher=publisher,
        catalog=OpenCatalog(),
    )
    views = client.enqueue_many(
        [
            {"name": "a", "params": {"i": 1}},
            {"name": "b", "delay": "1h", "priority": 9, "idempotency_key": "k1"},
            {"name": "c", "params": None, "timeout": 2.5, "project": "default"},
        ]
    )
    assert [(v.name, v.params, v.priority) for v in views] == [
        ("a", {"i": 1}, 5),
        ("b", {}, 9),
        ("c", {}, 5),
    ]
    assert views[1].not_before > views[0].not_before
    assert views[2].timeout_s == 2.5
    assert all(v.triggered_by == "client" for v in views)
    assert sorted(d.name for batch in publisher.batches for d in batch) == ["a", "c"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"params": {"i": 1}}, r"^items\[2\]\.name: missing"),
        ({"name": "x", "priority": 10}, r"^items\[2\]\.priority: Input should be less than"),
        ({"name": "x", "delay": "soon"}, r"^items\[2\]\.delay: 'soon' is not a duration"),
        ({"name": "x", "colour": "red"}, r"^items\[2\]\.colour: unknown field"),
        (("x", {"i": 1}), r"^items\[2\]: expected a mapping such as \{'name': 'x', 'params'"),
        ({"name": "x", "timeout": float("inf")}, r"^items\[2\]\.timeout_s: expected a finite"),
        ({"name": "x", "params": {"n": 2**64}}, r"^items\[2\]\.params: integer out of range"),
        ({"name": "x", "priority": True}, r"^items\[2\]\.priority: expected a number, not"),
        ({"name": "x", "delay": "10"}, r"^items\[2\]\.delay: 10 what\? use 10s, 10m"),
    ],
)
def test_one_bad_item_refuses_the_batch_naming_it(
    engine: Engine, db_url: str, bad: object, message: str
) -> None:
    client = Client(
        load_settings(database_url=db_url),
        engine=engine,
        publisher=FakePublisher(),
        catalog=OpenCatalog(),
    )
    items = [{"name": "ok", "params": {"i": 0}}, {"name": "ok"}, bad, {"name": "ok"}]
    with pytest.raises(InvalidInput, match=message):
        client.enqueue_many(items)
    assert _count(engine) == 0


@pytest.mark.parametrize("keyed", [False, True], ids=["copy", "keyed"])
def test_every_field_survives_the_batch_paths(engine: Engine, db_url: str, keyed: bool) -> None:
    """Batches without idempotency keys are COPY'd on PostgreSQL, batches with keys inserted
    with RETURNING: each value must arrive in its column's exact type, and read back as the
    view the batch returned (built from the row, not read back)."""
    client = Client(
        load_settings(database_url=db_url),
        engine=engine,
        publisher=FakePublisher(),
        catalog=OpenCatalog(),
    )
    items: list[dict[str, Any]] = [
        {
            "name": "full",
            "params": {"nested": {"list": [1, 2.5, None, "ü"]}, "flag": True},
            "priority": 0,
            "delay": "90s",
            "timeout": 30,  # an int into a float column
            "max_attempts": 7,
            "budget_usd": "12.3456789012",
            "max_requests": 40,
            "max_minutes": 3,
            "callback_url": "https://example.com/done",
        },
        {"name": "bare"},
    ]
    if keyed:
        items[0]["idempotency_key"] = "full-1"
    views = client.enqueue_many(items)
    stored = [client.get(v.id) for v in views]
    assert stored == views
    full = stored[0]
    assert full.params == {"nested": {"list": [1, 2.5, None, "ü"]}, "flag": True}
    assert (full.priority, full.timeout_s, full.max_attempts) == (0, 30.0, 7)
    assert str(full.budget_usd) == "12.3456789012"
    assert (full.max_requests, full.max_minutes) == (40, 3.0)
    assert (full.not_before - full.created_at).total_seconds() == 90


def test_the_garbage_collector_is_back_after_a_batch(engine: Engine, db_url: str) -> None:
    """enqueue_many pauses the cyclic collector while it builds a batch (domain.gc_pause);
    it resumes after success and after a refused batch, and stays off if the caller had
    turned it off."""
    client = Client(
        load_settings(database_url=db_url),
        engine=engine,
        publisher=FakePublisher(),
        catalog=OpenCatalog(),
    )
    assert gc.isenabled()
    client.enqueue_many([{"name": "ok"}] * 3)
    assert gc.isenabled()
    with pytest.raises(InvalidInput):
        client.enqueue_many([{"name": "ok"}, {"name": "bad", "priority": 99}])
    assert gc.isenabled()
    gc.disable()
    try:
        client.enqueue_many([{"name": "ok"}])
        assert not gc.isenabled()
    finally:
        gc.enable()
