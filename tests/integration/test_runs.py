"""Reading and steering runs: list with filters and keyset pages, logs, cancel, retry."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import Engine, insert, select

from domain.db.models import AuditLog, run_logs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput, InvalidTransition, RunNotFound
from domain.runs import control, enqueue
from domain.runs import store as runstore
from domain.runs.repository import RunFilter
from domain.runs.requests import build_request
from tests.fakes import FakeClock, FakePublisher


def make_runs(uow: UnitOfWork, clock: FakeClock, n: int, name: str = "t") -> list[uuid.UUID]:
    ids = []
    for i in range(n):
        clock.advance(0.001 if i % 3 else 0)  # some share a created_at: the id breaks the tie
        ids.append(enqueue.enqueue(uow, build_request(name=name, params={"i": i})).run.id)
    return ids


def test_keyset_pages_cover_every_run_once(uow: UnitOfWork, clock: FakeClock) -> None:
    ids = make_runs(uow, clock, 23)
    seen: list[uuid.UUID] = []
    cursor = None
    pages = 0
    while True:
        page = control.list_runs(uow, RunFilter(), limit=5, cursor=cursor)
        seen += [r.id for r in page.items]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 5
    assert seen == list(reversed(ids))  # newest first, no gap, no duplicate


def test_filters(uow: UnitOfWork, clock: FakeClock) -> None:
    make_runs(uow, clock, 3, name="a")
    start = clock.advance(10)
    b_ids = make_runs(uow, clock, 2, name="b")
    control.cancel_run(uow, b_ids[0], actor="test")
    assert {r.name for r in control.list_runs(uow, RunFilter(name="a")).items} == {"a"}
    assert len(control.list_runs(uow, RunFilter(created_after=start)).items) == 2
    assert len(control.list_runs(uow, RunFilter(created_before=start)).items) == 3
    cancelled = control.list_runs(uow, RunFilter(status=["cancelled"])).items
    assert [r.id for r in cancelled] == [b_ids[0]]
    assert control.list_runs(uow, RunFilter(project="nope")).items == []


def test_limit_out_of_range(uow: UnitOfWork) -> None:
    with pytest.raises(InvalidInput, match="limit: must be between 1 and 1000"):
        control.list_runs(uow, RunFilter(), limit=0)


def test_unknown_run_is_not_found(uow: UnitOfWork) -> None:
    missing = uuid.uuid4()
    for call in (
        lambda: control.get_run(uow, missing),
        lambda: control.cancel_run(uow, missing, actor="t"),
        lambda: control.retry_run(uow, missing, actor="t"),
        lambda: control.run_logs(uow, missing),
    ):
        with pytest.raises(RunNotFound, match=str(missing)):
            call()


def test_cancel_pending_ends_it_at_once_and_is_audited(engine: Engine, uow: UnitOfWork) -> None:
    run = enqueue.enqueue(uow, build_request(name="t")).run
    cancelled = control.cancel_run(uow, run.id, actor="alice")
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with engine.connect() as conn:
        audit = conn.execute(select(AuditLog.__table__)).mappings().one()
    assert (audit["actor"], audit["action"], audit["target_id"]) == (
        "alice",
        "run.cancel",
        str(run.id),
    )
    with engine.connect() as conn:  # a cancelled run can never be claimed
        assert runstore.claim(conn, run.id, owner="w", now=uow.clock(), lease_s=30) is None


def test_cancel_running_asks_the_executor(
    engine: Engine, uow: UnitOfWork, clock: FakeClock
) -> None:
    run = enqueue.enqueue(uow, build_request(name="t")).run
    with engine.begin() as conn:
        claim = runstore.claim(conn, run.id, owner="w", now=clock(), lease_s=30)
        assert claim is not None
        assert runstore.heartbeat(conn, run.id, 1, now=clock(), lease_s=30) is False
    asked = control.cancel_run(uow, run.id, actor="bob")
    assert asked.status == "running" and asked.cancel_requested_at is not None
    with engine.begin() as conn:
        assert runstore.heartbeat(conn, run.id, 1, now=clock(), lease_s=30) is True
        runstore.finish(conn, run.id, 1, status="cancelled", now=clock())
    with pytest.raises(InvalidTransition, match="already ended as cancelled"):
        control.cancel_run(uow, run.id, actor="bob")


def test_retry_makes_a_child_run(uow: UnitOfWork) -> None:
    publisher = FakePublisher()
    run = enqueue.enqueue(
        uow, build_request(name="t", params={"a": 1}, priority=2, max_attempts=3, queue="q")
    ).run
    with pytest.raises(InvalidTransition, match="only a finished run can be retried"):
        control.retry_run(uow, run.id, actor="t")
    control.cancel_run(uow, run.id, actor="t")
    child = control.retry_run(uow, run.id, actor="t", publisher=publisher)
    assert child.id != run.id and child.parent_run_id == run.id
    assert (child.name, child.params, child.priority, child.max_attempts, child.queue) == (
        "t",
        {"a": 1},
        2,
        3,
        "q",
    )
    assert child.triggered_by == "retry" and child.status == "pending"
    assert [d.run_id for d in publisher.published] == [child.id]


def test_logs_after_seq(engine: Engine, uow: UnitOfWork, clock: FakeClock) -> None:
    run = enqueue.enqueue(uow, build_request(name="t")).run
    with engine.begin() as conn:
        conn.execute(
            insert(run_logs),
            [
                {
                    "run_id": run.id,
                    "seq": i,
                    "attempt": 1,
                    "ts": clock(),
                    "stream": "log",
                    "level": "info",
                    "message": f"line {i}",
                    "fields": {"i": i},
                }
                for i in range(1, 11)
            ],
        )
    lines = control.run_logs(uow, run.id, after_seq=7)
    assert [line.seq for line in lines] == [8, 9, 10]
    assert lines[0].message == "line 8" and lines[0].fields == {"i": 8}
    with pytest.raises(InvalidInput, match="after_seq"):
        control.run_logs(uow, run.id, after_seq=-1)


def test_times_are_utc_aware(uow: UnitOfWork, clock: FakeClock) -> None:
    run = enqueue.enqueue(uow, build_request(name="t", delay_s=5)).run
    stored = control.get_run(uow, run.id)
    assert stored.created_at.utcoffset() == timedelta(0)
    assert stored.not_before == clock() + timedelta(seconds=5)
