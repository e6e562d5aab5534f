"""Fair share on a real database (both): a busy queue keeps `in_flight_limit` runs published,
the rest wait for their project's turn; turns go to the project with the fewest in flight for
its weight; claims, the enqueue and the relay give the turns; nothing is lost when pacing is
turned off."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update

from domain.clock import utc_now
from domain.costs import projects
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput
from domain.flow import fair
from domain.runs import control, enqueue
from domain.runs.recovery import relay_once
from domain.runs.requests import build_request
from domain.tasks.registry import RegistryCatalog
from tests.fakes import FakePublisher
from tests.integration.conftest import Harness

LIMIT = 5


class LimitedPublisher(FakePublisher):
    in_flight_limit = LIMIT


def _project(engine: Engine, name: str, weight: int = 1) -> None:
    projects.add_project(UnitOfWork(engine), name, weight=weight, now=utc_now())


def _enqueue(engine: Engine, publisher: Any, project: str, n: int) -> list[uuid.UUID]:
    reqs = [build_request(name="job", project=project, params={"i": i}) for i in range(n)]
    made = enqueue.enqueue_many(UnitOfWork(engine), reqs, publisher=publisher)
    return [m.run.id for m in made]


def _claim(engine: Engine, ids: list[uuid.UUID]) -> None:
    """As workers do: the runs leave the broker (running), freeing their places."""
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id.in_(ids))
            .values(status="running", lease_expires_at=utc_now() + timedelta(seconds=60))
        )


def _waiting(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(runs.c.paced, runs.c.dispatched_at.is_(None))
            ).scalar_one()
        )


def test_turns_favour_the_project_with_fewest_in_flight_for_its_weight() -> None:
    t0 = datetime(2026, 12, 1, tzinfo=UTC)

    def runs_of(project: str, n: int, start: int) -> list[Any]:
        return [
            SimpleNamespace(id=f"{project}{i}", created_at=t0 + timedelta(seconds=start + i))
            for i in range(n)
        ]

    waiting = {"a": runs_of("a", 100, 0), "b": runs_of("b", 100, 1000)}
    picked = fair.turns(waiting, {}, {"a": 1, "b": 3}, 40)
    assert Counter(r.id[0] for r in picked) == {"b": 30, "a": 10}
    # A project with nothing in flight goes first, even with the younger runs.
    first = fair.turns(waiting, {"a": 50}, {"a": 1, "b": 1}, 10)
    assert [r.id for r in first] == [f"b{i}" for i in range(10)]
    # Equal in flight, equal weight: places alternate, the older run first.
    assert [r.id for r in fair.turns(waiting, {}, {}, 4)] == ["a0", "b0", "a1", "b1"]


def test_a_busy_queue_keeps_its_limit_in_flight_and_a_late_project_goes_first(
    engine: Engine,
) -> None:
    _project(engine, "a")
    _project(engine, "b")
    publisher = LimitedPublisher()
    a = _enqueue(engine, publisher, "a", 20)
    assert [d.run_id for d in publisher.published] == a[:LIMIT]  # the turns right after commit
    assert _waiting(engine) == 15
    b = _enqueue(engine, publisher, "b", 3)
    assert len(publisher.published) == LIMIT  # no place free: B waits too, not in the broker
    assert _waiting(engine) == 18
    waits = control.get_run(UnitOfWork(engine), b[0]).waits_for()
    assert waits == "its project's turn in the busy queue 'default' (fair share)"
    assert control.get_run(UnitOfWork(engine), a[0]).waits_for() is None  # in the broker

    _claim(engine, a[:4])
    with engine.begin() as conn:
        given = fair.top_up(conn, "default", limit=LIMIT, now=utc_now())
    # A has one in flight, B none: B first, then alternating, the older run on a tie.
    assert [d.run_id for d in given] == [b[0], a[5], b[1], a[6]]
    with engine.begin() as conn:
        assert fair.top_up(conn, "default", limit=LIMIT, now=utc_now()) == []  # full again


def test_an_enqueue_tops_up_once_a_quarter_of_the_places_are_free(engine: Engine) -> None:
    """A producer that outruns the workers does not top up at each enqueue, one freed place at
    a time: only once a quarter of the window is free (fair.top_up_at), as claims do. One run
    at a time (on PostgreSQL the single statement decides; on SQLite fair.pace)."""

    class EightPlaces(FakePublisher):
        in_flight_limit = 8  # a quarter: 2

    _project(engine, "a")
    publisher = EightPlaces()

    def one() -> uuid.UUID:
        made = enqueue.enqueue(
            UnitOfWork(engine), build_request(name="job", project="a"), publisher=publisher
        )
        return made.run.id

    runs_ = [one() for _ in range(11)]
    assert [d.run_id for d in publisher.published] == runs_[:8] and _waiting(engine) == 3
    _claim(engine, runs_[:1])  # one place free: not worth a top-up
    runs_.append(one())
    assert len(publisher.published) == 8 and _waiting(engine) == 4
    _claim(engine, runs_[1:2])  # two free: this enqueue gives both (the oldest waiting)
    runs_.append(one())
    assert [d.run_id for d in publisher.published[8:]] == runs_[8:10]
    assert _waiting(engine) == 3


def test_the_relay_gives_turns_and_leaves_waiting_runs_to_them(engine: Engine) -> None:
    _project(engine, "a")
    a = _enqueue(engine, LimitedPublisher(), "a", 12)
    relay = FakePublisher()
    stale = relay_once(engine, relay, clock=utc_now, grace_s=30, in_flight=LIMIT)
    assert stale.published == 0 and relay.published == []  # full, and none re-sent early
    _claim(engine, a[:3])
    relay_once(engine, relay, clock=utc_now, grace_s=30, in_flight=LIMIT)
    assert [d.run_id for d in relay.published] == a[5:8]
    # Pacing turned off: the runs that waited for a turn are plain unpublished runs.
    relay_once(engine, relay, clock=utc_now, grace_s=30, in_flight=0)
    assert {d.run_id for d in relay.published} == set(a[5:])
    assert _waiting(engine) == 0


def test_a_worker_claiming_a_paced_run_gives_the_next_turns(h: Harness) -> None:
    @h.registry.task()
    def job(ctx: Any, i: int) -> int:
        return i

    _project(h.engine, "a")
    publisher = LimitedPublisher()
    h.executor.publisher = publisher
    reqs = [build_request(name="job", project="a", params={"i": i}) for i in range(12)]
    a = [m.run.id for m in enqueue.enqueue_many(UnitOfWork(h.engine), reqs, publisher=publisher)]
    assert len(publisher.published) == LIMIT
    assert h.run(a[0]) == "succeeded"  # one place free: below a quarter of 5 is at least 1
    assert [d.run_id for d in publisher.published][LIMIT:] == [a[5]]
    with h.engine.connect() as conn:
        row = conn.execute(select(runs.c.paced).where(runs.c.id == a[0])).one()
    assert row.paced is True


def test_a_quiet_queue_publishes_at_once(engine: Engine) -> None:
    _project(engine, "a")
    publisher = LimitedPublisher()
    ids = _enqueue(engine, publisher, "a", LIMIT)
    assert [d.run_id for d in publisher.published] == ids and _waiting(engine) == 0
    with engine.connect() as conn:
        assert not any(conn.execute(select(runs.c.paced)).scalars())


@pytest.mark.parametrize("weight", [0, 1001, True, 2.5])
def test_a_weight_out_of_range_is_refused(engine: Engine, weight: Any) -> None:
    with pytest.raises(InvalidInput, match="weight: a whole number from 1 to 1000"):
        projects.add_project(UnitOfWork(engine), "w", weight=weight, now=utc_now())
    _project(engine, "w2", weight=7)
    assert projects.show_project(UnitOfWork(engine), "w2", now=utc_now())["weight"] == 7
    with pytest.raises(InvalidInput, match="weight"):
        projects.set_limits(UnitOfWork(engine), "w2", weight=weight, now=utc_now())


def test_a_paced_run_parked_at_its_claim_frees_its_place(h: Harness) -> None:
    from domain.flow import rates

    @h.registry.task(rate_limit="one-a-minute")
    def limited(ctx: Any, i: int) -> int:
        return i

    with h.engine.begin() as conn:
        rates.save(conn, rates.RateLimit("one-a-minute", 1), defined_in="api", now=utc_now())
    _project(h.engine, "a")
    publisher = LimitedPublisher()
    h.executor.publisher = publisher
    reqs = [build_request(name="limited", project="a", params={"i": i}) for i in range(12)]
    catalog = RegistryCatalog(h.registry)
    made = enqueue.enqueue_many(UnitOfWork(h.engine), reqs, publisher=publisher, catalog=catalog)
    a = [m.run.id for m in made]
    assert h.run(a[0]) == "succeeded"
    assert h.run(a[1]) == "waiting"  # no room in the minute: parked, out of the broker
    assert [d.run_id for d in publisher.published][LIMIT:] == [a[5], a[6]]


def test_runs_enqueued_one_at_a_time_are_paced_as_a_batch_is(engine: Engine) -> None:
    """The single enqueue decides in its one statement on PostgreSQL (domain/runs/insert_pg.py)
    and in its transaction elsewhere: the same runs wait, and turns go out only when the queue
    has a free place (a full one is topped up by the claims that free its places)."""
    _project(engine, "a")
    _project(engine, "b")
    publisher = LimitedPublisher()
    a = [_enqueue(engine, publisher, "a", 1)[0] for _ in range(8)]
    assert [d.run_id for d in publisher.published] == a[:LIMIT]
    assert _waiting(engine) == 3
    b = _enqueue(engine, publisher, "b", 1)
    assert len(publisher.published) == LIMIT and _waiting(engine) == 4  # full: B waits
    _claim(engine, a[:2])
    late = _enqueue(engine, publisher, "b", 1)  # room, and runs waiting: turns go out
    # Two places, A with 3 in flight and B none: both go to B, its older run first.
    assert [d.run_id for d in publisher.published][LIMIT:] == [b[0], late[0]]
    assert _waiting(engine) == 3  # A's three
    assert control.get_run(UnitOfWork(engine), late[0]).waits_for() is None


def test_topping_up_a_queue_nobody_paces_gives_nothing(engine: Engine) -> None:
    with engine.begin() as conn:
        assert fair.top_up(conn, "default", limit=LIMIT, now=utc_now()) == []


def test_a_project_whose_waiting_runs_are_not_due_yet_gets_no_turn(engine: Engine) -> None:
    """Found by bench/throughput.py --producer single: a run created a moment after the
    top-up's clock is waiting but not due; its project must be passed over, not break the
    top-up (and with it the claim that gave the turn)."""
    _project(engine, "a")
    _project(engine, "b")
    a = _enqueue(engine, LimitedPublisher(), "a", LIMIT + 2)
    reqs = [build_request(name="job", project="b", delay_s=60)]
    enqueue.enqueue_many(UnitOfWork(engine), reqs, publisher=LimitedPublisher())
    with engine.begin() as conn:  # B's run: not due, so not sent
        conn.execute(update(runs).where(runs.c.project == "b").values(paced=True))
    _claim(engine, a[:1])
    with engine.begin() as conn:
        given = fair.top_up(conn, "default", limit=LIMIT, now=utc_now())
    assert [d.run_id for d in given] == [a[LIMIT]]
    assert fair.turns({"a": [], "b": []}, {}, {}, 3) == []
