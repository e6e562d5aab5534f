"""Enqueue: durable (row first, publish after commit), idempotent, batched; bad input: no rows."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from datetime import timedelta

import pytest
from sqlalchemy import Engine, event, func, select

from domain.db.engine import create_db_engine
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, InvalidInput
from domain.ports import Dispatch
from domain.runs import control, dispatch, enqueue
from domain.runs import store as runstore
from domain.runs.requests import build_request
from tests.fakes import FakeClock, FakePublisher, PreparingPublisher


def count_runs(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(runs)).scalar_one())


def test_enqueue_writes_the_run_then_publishes_after_commit(
    engine: Engine, uow: UnitOfWork
) -> None:
    seen_from_another_connection: list[str] = []

    def look(dispatches: Sequence[Dispatch]) -> None:
        # A separate connection only sees committed rows: the run must be there already.
        with engine.connect() as conn:
            status = conn.execute(
                select(runs.c.status).where(runs.c.id == dispatches[0].run_id)
            ).scalar_one()
        seen_from_another_connection.append(status)

    publisher = FakePublisher(on_publish=look)
    run = enqueue.enqueue(
        uow,
        build_request(name="send_report", params={"customer_id": 7}, priority=8, queue="mail"),
        publisher=publisher,
    ).run
    assert seen_from_another_connection == ["pending"]
    assert publisher.published == [Dispatch(run.id, "send_report", "mail", 8, {"customer_id": 7})]
    stored = control.get_run(uow, run.id)
    assert stored.params == {"customer_id": 7}
    assert stored.status == "pending" and stored.attempt == 0
    assert stored.dispatched_at == uow.clock() and stored.dispatch_attempts == 1


def test_a_broker_outage_loses_nothing(engine: Engine, uow: UnitOfWork, clock: FakeClock) -> None:
    """The publish failed: the run is the relay's at once, not a dispatch grace later."""
    publisher = FakePublisher()
    publisher.down = True
    run = enqueue.enqueue(uow, build_request(name="t"), publisher=publisher).run
    assert publisher.published == []
    stored = control.get_run(uow, run.id)
    assert (stored.status, stored.dispatched_at, stored.dispatch_attempts) == ("pending", None, 0)
    with engine.connect() as conn:
        due = dispatch.due_for_dispatch(conn, now=clock(), grace_s=30)
    assert [d[0] for d in due] == [run.id]


def test_deferred_run_waits_for_the_relay(
    engine: Engine, uow: UnitOfWork, clock: FakeClock
) -> None:
    publisher = FakePublisher()
    run = enqueue.enqueue(uow, build_request(name="t", delay_s=60), publisher=publisher).run
    assert publisher.published == []  # no broker-side eta: the database holds it
    assert run.not_before == clock() + timedelta(seconds=60)
    with engine.connect() as conn:
        assert runstore.claim(conn, run.id, owner="w", now=clock(), lease_s=30) is None
        assert dispatch.due_for_dispatch(conn, now=clock.advance(59), grace_s=30) == []
        assert len(dispatch.due_for_dispatch(conn, now=clock.advance(2), grace_s=30)) == 1


def test_without_a_publisher_the_relay_delivers(
    engine: Engine, uow: UnitOfWork, clock: FakeClock
) -> None:
    run = enqueue.enqueue(uow, build_request(name="t")).run
    assert run.dispatched_at is None
    with engine.begin() as conn:
        due = dispatch.due_for_dispatch(conn, now=clock(), grace_s=30)
        assert [d[0] for d in due] == [run.id]
        dispatch.mark_dispatched(conn, [run.id], now=clock())
        assert dispatch.due_for_dispatch(conn, now=clock(), grace_s=30) == []


def test_idempotency_key_returns_the_same_run(engine: Engine, uow: UnitOfWork) -> None:
    publisher = FakePublisher()
    first = enqueue.enqueue(
        uow, build_request(name="t", params={"a": 1}, idempotency_key="k"), publisher=publisher
    )
    again = enqueue.enqueue(
        uow, build_request(name="t", params={"a": 1}, idempotency_key="k"), publisher=publisher
    )
    assert first.created and not again.created
    assert again.run.id == first.run.id
    assert len(publisher.published) == 1
    assert count_runs(engine) == 1


def test_idempotency_key_is_per_project(engine: Engine, uow: UnitOfWork) -> None:
    with engine.begin() as conn:
        conn.execute(
            runs.metadata.tables["projects"].insert().values(name="other", created_at=uow.clock())
        )
    a = enqueue.enqueue(uow, build_request(name="t", idempotency_key="k")).run
    b = enqueue.enqueue(uow, build_request(name="t", idempotency_key="k", project="other")).run
    assert a.id != b.id


def test_reusing_a_key_for_different_work_is_a_conflict(engine: Engine, uow: UnitOfWork) -> None:
    enqueue.enqueue(uow, build_request(name="t", params={"a": 1}, idempotency_key="k"))
    with pytest.raises(Conflict, match="already used for a different request"):
        enqueue.enqueue(uow, build_request(name="t", params={"a": 2}, idempotency_key="k"))
    assert count_runs(engine) == 1


def test_eight_threads_racing_on_one_key_make_one_run(engine: Engine, clock: FakeClock) -> None:
    barrier = threading.Barrier(8)
    ids: list[object] = []
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            barrier.wait()
            result = enqueue.enqueue(
                UnitOfWork(engine, clock=clock),
                build_request(name="t", params={"x": 1}, idempotency_key="race"),
            )
            ids.append(result.run.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=producer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == 8 and len(set(ids)) == 1
    assert count_runs(engine) == 1


def test_unknown_project_is_refused_and_writes_nothing(engine: Engine, uow: UnitOfWork) -> None:
    publisher = FakePublisher()
    with pytest.raises(InvalidInput, match="project: no project named 'ghost'"):
        enqueue.enqueue(uow, build_request(name="t", project="ghost"), publisher=publisher)
    assert count_runs(engine) == 0
    assert publisher.published == []


def test_enqueue_many_is_one_transaction_and_one_publish(engine: Engine, uow: UnitOfWork) -> None:
    publisher = FakePublisher()
    requests = [build_request(name="resize", params={"i": i}) for i in range(2500)]
    results = enqueue.enqueue_many(uow, requests, publisher=publisher)
    assert len(results) == 2500 and all(r.created for r in results)
    assert len(publisher.batches) == 1 and len(publisher.batches[0]) == 2500
    assert count_runs(engine) == 2500
    assert [r.run.params["i"] for r in results] == list(range(2500))


def test_enqueue_many_collapses_duplicate_keys(engine: Engine, uow: UnitOfWork) -> None:
    existing = enqueue.enqueue(uow, build_request(name="t", idempotency_key="old")).run
    publisher = FakePublisher()
    results = enqueue.enqueue_many(
        uow,
        [
            build_request(name="t", idempotency_key="old"),
            build_request(name="t", idempotency_key="new"),
            build_request(name="t", idempotency_key="new"),
            build_request(name="t"),
        ],
        publisher=publisher,
    )
    assert [r.created for r in results] == [False, True, False, True]
    assert results[0].run.id == existing.id
    assert results[1].run.id == results[2].run.id
    assert len(publisher.published) == 2
    assert count_runs(engine) == 3


@pytest.mark.parametrize("key", [None, "k"], ids=["copy", "keyed"])
def test_enqueue_many_with_a_bad_project_writes_nothing(
    engine: Engine, uow: UnitOfWork, key: str | None
) -> None:
    requests = [
        build_request(name="t", idempotency_key=key),
        build_request(name="t", project="ghost", idempotency_key=key),
    ]
    with pytest.raises(InvalidInput, match="ghost"):
        enqueue.enqueue_many(uow, requests, publisher=FakePublisher())
    assert count_runs(engine) == 0


@pytest.mark.postgres  # on SQLite a second connection's read would wait for the writer
@pytest.mark.parametrize("size", [1, 300])
def test_messages_are_prepared_before_commit_and_sent_after(pg_url: str, size: int) -> None:
    engine = create_db_engine(pg_url)
    try:
        publisher = PreparingPublisher(engine)
        requests = [build_request(name="t", params={"i": i}) for i in range(size)]
        enqueue.enqueue_many(UnitOfWork(engine), requests, publisher=publisher)
        # A batch's messages are built while the database ends its insert; a single run's
        # insert is one statement (domain/runs/insert_pg.py), its message built after it.
        prepared = 0 if size > 1 else size
        assert publisher.seen == [("prepare", size, prepared), ("send", size, size)]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_single_enqueue_is_one_statement_on_the_driver(pg_url: str) -> None:
    """No BEGIN, no limit read, no COMMIT through SQLAlchemy: the project-limit check, the
    pacing decision and the insert are one prepared statement in autocommit."""
    engine = create_db_engine(pg_url)
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _count(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        seen.append(statement)

    try:
        publisher = FakePublisher()
        made = enqueue.enqueue(UnitOfWork(engine), build_request(name="t"), publisher=publisher)
        assert made.created and seen == []
        assert [d.run_id for d in publisher.published] == [made.run.id]
        assert count_runs(engine) == 1
        # What the one statement cannot answer goes the general way, with its explanation.
        with pytest.raises(InvalidInput, match="no project named 'ghost'"):
            enqueue.enqueue(UnitOfWork(engine), build_request(name="t", project="ghost"))
        assert seen and count_runs(engine) == 1
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_forked_process_enqueues_on_a_connection_of_its_own(pg_url: str) -> None:
    engine = create_db_engine(pg_url)
    try:
        enqueue.enqueue(UnitOfWork(engine), build_request(name="t", params={"who": "parent"}))
        child = os.fork()
        if child == 0:  # the parent's connection must not be used (nor closed) from here
            code = 1
            try:
                enqueue.enqueue(
                    UnitOfWork(engine), build_request(name="t", params={"who": "child"})
                )
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        enqueue.enqueue(UnitOfWork(engine), build_request(name="t", params={"who": "again"}))
        with engine.connect() as conn:
            who = sorted(p["who"] for p in conn.execute(select(runs.c.params)).scalars())
        assert who == ["again", "child", "parent"]
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("optional", ["unset", "set"])
def test_the_single_statement_stores_what_the_general_path_stores(
    pg_url: str, optional: str
) -> None:
    """The one-statement insert leaves out the columns a run leaves empty (fewer parameters):
    each run it stores, with every optional field set or none, equals the general path's."""
    engine = create_db_engine(pg_url)
    clock = FakeClock()
    fields: dict[str, object] = {"name": "t", "params": {"n": 1, "text": "é"}}
    if optional == "set":
        fields.update(
            queue="q",
            priority=7,
            max_attempts=3,
            timeout_s=12.5,
            budget_usd="0.25",
            max_requests=9,
            max_minutes=1.5,
            trigger_ref="ref-1",
            concurrency_key="k",
            concurrency_max=2,
        )
    try:
        publisher = FakePublisher()
        single = enqueue.enqueue(
            UnitOfWork(engine, clock=clock),
            build_request(**fields, idempotency_key="one" if optional == "set" else None),
            publisher=publisher,
        ).run
        general = enqueue.enqueue_many(  # a batch: never the single statement
            UnitOfWork(engine, clock=clock),
            [
                build_request(**fields, idempotency_key="two" if optional == "set" else None),
                build_request(name="t"),
            ],
            publisher=publisher,
        )[0].run
        with engine.connect() as conn:
            stored = {
                row["id"]: dict(row)
                for row in conn.execute(
                    select(runs).where(runs.c.id.in_([single.id, general.id]))
                ).mappings()
            }
        ours, theirs = stored[single.id], stored[general.id]
        for differs in ("id", "idempotency_key"):
            ours.pop(differs), theirs.pop(differs)
        assert ours == theirs
        assert (ours["budget_usd"] is None) == (optional == "unset")
    finally:
        engine.dispose()
