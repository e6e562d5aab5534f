"""Keyed concurrency on a real executor and database: at most `max` runs of a key at once, the
others waiting without a worker in FIFO order and handed the slot as it frees (finish, sleep,
cancel, a dead worker's expired lease); bad definitions are clear errors before anything is
written."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update

from domain.clock import utc_now
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ConfigurationError, InvalidInput
from domain.flow import concurrency
from domain.flow.concurrency import Limit
from domain.runs import control
from domain.runs.recovery import reap_once
from domain.tasks.registry import Registry
from tests.fakes import FakePublisher
from tests.integration.conftest import Harness, harness
from tests.polling import eventually

RELEASE = threading.Event()


def _tasks(registry: Registry) -> None:
    @registry.task(concurrency=Limit(key="{repo}:{branch}", max=1))
    def build(ctx: Any, repo: str, branch: str = "main", hold: bool = False) -> str:
        if hold:
            RELEASE.wait(20)
        return f"built {repo}:{branch}"

    @registry.task(concurrency=Limit(key=lambda p: p["who"].lower(), max=2))
    def per_user(ctx: Any, who: str, nap: float = 0.0) -> str:
        if nap:
            ctx.sleep(nap)
        return who


@pytest.fixture
def pair(engine: Engine) -> Iterator[tuple[Harness, Harness]]:
    """Two workers on one database (one may hold a slot while the other claims)."""
    RELEASE.clear()
    with harness(engine, owner="worker-a") as a, harness(engine, owner="worker-b") as b:
        _tasks(a.registry)
        _tasks(b.registry)
        yield a, b
    RELEASE.set()


def _row(h: Harness, run_id: uuid.UUID) -> Any:
    with h.engine.connect() as conn:
        return conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()


def _due(h: Harness, run_id: uuid.UUID) -> bool:
    return bool(_row(h, run_id)["not_before"] <= utc_now())


def _hold(h: Harness, run_id: uuid.UUID) -> threading.Thread:
    """Run `run_id` on `h` in a thread; returns once it is running (holding its slot)."""
    thread = threading.Thread(target=h.run, args=(run_id,), daemon=True)
    thread.start()
    eventually(lambda: _row(h, run_id)["status"] == "running", timeout=10)
    return thread


def test_a_second_run_of_a_key_waits_and_is_handed_the_slot_when_the_first_ends(
    pair: tuple[Harness, Harness],
) -> None:
    a, b = pair
    first = a.enqueue("build", params={"repo": "api", "hold": True})
    second = a.enqueue("build", params={"repo": "api"})
    other_branch = a.enqueue("build", params={"repo": "api", "branch": "dev"})
    row = _row(a, first)
    assert (row["concurrency_key"], row["concurrency_max"]) == ("api:main", 1)
    holder = _hold(a, first)

    assert b.run(second) == "waiting"
    waiting = _row(b, second)
    assert (waiting["status"], waiting["wait_reason"], waiting["attempt"]) == (
        "waiting",
        "concurrency:api:main",
        1,
    )
    assert waiting["lease_owner"] is None and waiting["started_at"] is None
    assert not _due(b, second)  # no polling: its wake time is only the net
    assert b.run(other_branch) == "succeeded"  # another key is not held up

    RELEASE.set()
    holder.join(10)
    assert _row(a, first)["status"] == "succeeded"
    assert _due(b, second)  # the finishing attempt handed its slot on
    assert b.run(second) == "succeeded"
    done = _row(b, second)
    assert (done["attempt"], done["wait_reason"]) == (1, None)  # the attempt it waited in


def test_waiters_start_in_the_order_they_came_as_many_as_there_are_slots(
    pair: tuple[Harness, Harness],
) -> None:
    a, b = pair
    ids = [a.enqueue("per_user", params={"who": "Ann", "nap": 60}) for _ in range(5)]
    assert [b.run(i) for i in ids[:2]] == ["waiting", "waiting"]  # asleep: they hold no slot
    assert {_row(b, i)["wait_reason"] for i in ids[:2]} == {"sleep"}
    with b.engine.begin() as conn:  # two others hold ann's two slots
        conn.execute(
            update(runs)
            .where(runs.c.id.in_(ids[:2]))
            .values(
                status="running",
                lease_owner="elsewhere",
                lease_expires_at=utc_now() + timedelta(seconds=60),
            )
        )
    assert [b.run(i) for i in ids[2:]] == ["waiting"] * 3
    assert [_row(b, i)["wait_reason"] for i in ids[2:]] == ["concurrency:ann"] * 3
    with b.engine.begin() as conn:  # one holder ends: one slot, to the oldest waiter
        conn.execute(update(runs).where(runs.c.id == ids[0]).values(status="succeeded"))
        woken = concurrency.refill(conn, "ann", 2, now=utc_now(), publishing=True)
    assert [d.run_id for d in woken] == [ids[2]]
    assert [_due(b, i) for i in ids[2:]] == [True, False, False]
    with b.engine.begin() as conn:  # nothing more is free: no one else is woken
        assert concurrency.refill(conn, "ann", 2, now=utc_now(), publishing=True) == []
    with b.engine.begin() as conn:  # the last waiter's net wakes it: it cannot overtake
        conn.execute(update(runs).where(runs.c.id == ids[4]).values(not_before=utc_now()))
    assert b.run(ids[4]) == "waiting"
    assert _row(b, ids[4])["wait_reason"] == "concurrency:ann" and not _due(b, ids[4])
    assert b.run(ids[2]) == "waiting"  # the woken one starts (and goes to sleep)
    assert (_row(b, ids[2])["wait_reason"], _row(b, ids[2])["attempt"]) == ("sleep", 1)


def test_a_sleeping_keyed_run_gives_its_slot_to_the_next(pair: tuple[Harness, Harness]) -> None:
    a, _ = pair
    ids = [a.enqueue("per_user", params={"who": "bob", "nap": 60}) for _ in range(3)]
    assert [a.run(i) for i in ids] == ["waiting"] * 3  # each sleeps; none holds a slot
    assert {_row(a, i)["wait_reason"] for i in ids} == {"sleep"}


def test_a_dead_workers_slot_is_free_once_its_lease_expired(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    first = a.enqueue("build", params={"repo": "web"})
    second = a.enqueue("build", params={"repo": "web"})
    claim = a.executor.store.claim(first, owner="dead-worker", now=utc_now(), lease_s=30)
    assert claim is not None
    assert b.run(second) == "waiting"
    with a.engine.begin() as conn:  # the holder's worker died: its lease runs out
        conn.execute(
            update(runs)
            .where(runs.c.id == first)
            .values(lease_expires_at=utc_now() - timedelta(seconds=1))
        )
    assert reap_once(a.engine, clock=utc_now) == (0, 1)  # build has one attempt: failed
    assert _due(b, second)
    assert b.run(second) == "succeeded"


def test_cancelling_the_waiter_handed_a_slot_hands_it_to_the_next(
    pair: tuple[Harness, Harness],
) -> None:
    a, b = pair
    first = a.enqueue("build", params={"repo": "cli", "hold": True})
    queued = [a.enqueue("build", params={"repo": "cli"}) for _ in range(2)]
    holder = _hold(a, first)
    assert [b.run(i) for i in queued] == ["waiting", "waiting"]
    RELEASE.set()
    holder.join(10)
    assert [_due(b, i) for i in queued] == [True, False]
    control.cancel_run(UnitOfWork(b.engine), queued[0], actor="test")
    assert _row(b, queued[0])["status"] == "cancelled"
    assert _due(b, queued[1])
    assert b.run(queued[1]) == "succeeded"


def test_an_enqueue_override_and_the_counts(pair: tuple[Harness, Harness]) -> None:
    a, _ = pair
    one = a.enqueue("build", params={"repo": "x"}, concurrency_key="shared", concurrency_max=3)
    row = _row(a, one)
    assert (row["concurrency_key"], row["concurrency_max"]) == ("shared", 3)
    plain = a.enqueue("per_user", params={"who": "Zoë"})
    assert _row(a, plain)["concurrency_key"] == "zoë"
    with a.engine.connect() as conn:
        keyed = conn.execute(
            select(func.count()).where(runs.c.concurrency_key.is_not(None))
        ).scalar_one()
    assert keyed == 2


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (lambda: Limit(key="{repo}", max=0), "Limit.max: 1 to 10000, got 0"),
        (lambda: Limit(key="{repo}", max=True), "Limit.max: a whole number"),
        (lambda: Limit(key="all", max=1), "names no param"),
        (lambda: Limit(key="{0}"), "{0} is not a param name"),
        (lambda: Limit(key="{repo"), "Limit.key '{repo'"),
    ],
)
def test_a_bad_limit_is_refused_where_it_is_written(limit: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        limit()
    assert message in str(caught.value)


def test_a_key_naming_a_missing_param_is_refused_at_definition() -> None:
    registry = Registry()
    with pytest.raises(ConfigurationError) as caught:

        @registry.task(concurrency=Limit(key="{repo}:{brnch}"))
        def deploy(ctx: Any, repo: str, branch: str) -> None: ...

    assert str(caught.value) == (
        "task 'deploy': concurrency key '{repo}:{brnch}' names brnch, which is not a param "
        "of the task (its params: branch, repo)"
    )
    with pytest.raises(ConfigurationError, match="concurrency takes a Limit"):

        @registry.task(concurrency=1)  # type: ignore[arg-type]
        def other(ctx: Any) -> None: ...


def test_bad_keys_at_enqueue_are_clear_errors_and_write_nothing(
    pair: tuple[Harness, Harness],
) -> None:
    a, _ = pair

    @a.registry.task(concurrency=Limit(key=lambda p: p["missing"]))
    def broken(ctx: Any, x: int = 0) -> None: ...

    @a.registry.task()
    def noop(ctx: Any) -> None: ...

    with pytest.raises(InvalidInput, match="param 'missing' is missing"):
        a.enqueue("broken")
    with pytest.raises(InvalidInput, match="concurrency_key: text of 1 to 200"):
        a.enqueue("build", params={"repo": "r" * 300})
    with pytest.raises(InvalidInput, match="concurrency_max: task 'noop' has no concurrency"):
        a.enqueue("noop", concurrency_max=2)
    with pytest.raises(InvalidInput, match="concurrency_max"):
        a.enqueue("build", params={"repo": "r"}, concurrency_max=0)
    with a.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(runs)).scalar_one() == 0


def test_a_free_slot_is_never_left_to_the_net_when_an_older_run_came_late(
    pair: tuple[Harness, Harness],
) -> None:
    """Deliveries are not in creation order: the slot went to a younger waiter, and an older
    run reached the gate after. The younger one yields to it, and wakes it."""
    a, b = pair
    older = a.enqueue("build", params={"repo": "late"})
    younger = a.enqueue("build", params={"repo": "late"})
    with a.engine.begin() as conn:
        for run_id, wake in ((older, timedelta(minutes=5)), (younger, timedelta(0))):
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(
                    status="waiting",
                    wait_reason="concurrency:late:main",
                    attempt=1,
                    not_before=utc_now() + wake,
                )
            )
    publisher = FakePublisher()
    b.executor.publisher = publisher
    assert b.run(younger) == "waiting"  # the older one is ahead of it
    assert not _due(b, younger) and _due(b, older)
    # Sent at once, not left to the relay, at the top priority: the slot is kept for it.
    assert [(d.run_id, d.priority) for d in publisher.published] == [(older, 9)]
    assert _row(b, older)["dispatched_at"] is not None
    assert b.run(older) == "succeeded"
    assert _due(b, younger)
    assert b.run(younger) == "succeeded"
