"""The RunStore contract, held against every implementation on every database it runs on:
the portable one on SQLite and PostgreSQL, and PostgreSQL's prepared statements (claim and
finish as one statement each) against the general `store.claim` path. Same claim, same fence,
same stored rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select, text

from domain.clock import utc_now
from domain.costs.admission import Refused
from domain.db.models import run_logs, run_steps, runs
from domain.db.unit_of_work import UnitOfWork
from domain.flow import concurrency
from domain.runs import control, enqueue, steps
from domain.runs import lines as run_lines
from domain.runs import store as runstore
from domain.runs.requests import build_request
from domain.runs.store import RunStore, SqlRunStore
from domain.runs.store_pg import PgRunStore
from domain.storage import run_store
from tests.polling import eventually


@pytest.fixture
def store(kind: str, db: Engine) -> Iterator[RunStore]:
    implementation: RunStore = PgRunStore(db) if kind.startswith("pg") else SqlRunStore(db)
    yield implementation
    implementation.close()


def test_storage_picks_the_prepared_statements_on_postgresql(kind: str, db: Engine) -> None:
    chosen = run_store(db)
    expected = PgRunStore if kind.endswith("postgres") else SqlRunStore
    assert type(chosen) is expected
    chosen.close()


def _enqueue(engine: Engine, **fields: Any) -> uuid.UUID:
    request = build_request(name="job", **fields)
    return enqueue.enqueue(UnitOfWork(engine), request).run.id


def _line(run_id: uuid.UUID, seq: int, attempt: int, message: str, fields: Any) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "seq": seq,
        "attempt": attempt,
        "ts": utc_now(),
        "stream": "log",
        "level": "info",
        "message": message,
        "fields": fields,
    }


def test_claim_matches_the_general_path_and_is_taken_once(db: Engine, store: RunStore) -> None:
    fields = {"params": {"a": 1}, "budget_usd": "1.25", "max_requests": 3, "priority": 7}
    fast_id, general_id = _enqueue(db, **fields), _enqueue(db, **fields)
    now = utc_now()
    fast = store.claim(fast_id, owner="w1", now=now, lease_s=30)
    with db.begin() as conn:
        general = runstore.claim(conn, general_id, owner="w1", now=now, lease_s=30)
    assert fast is not None and general is not None
    assert fast.run_id == fast_id
    assert fast.budget_usd == Decimal("1.25")
    assert fast.started_at.utcoffset() == timedelta(0)
    same = ("name", "kind", "project", "params", "attempt", "max_attempts", "budget_usd")
    assert [getattr(fast, f) for f in same] == [getattr(general, f) for f in same]
    assert (fast.max_requests, fast.priority, fast.started_at) == (3, 7, now)
    # Owned now: a second delivery of the same message gets nothing.
    assert store.claim(fast_id, owner="w2", now=now, lease_s=30) is None
    with db.connect() as conn:
        row = conn.execute(select(runs).where(runs.c.id == fast_id)).mappings().one()
    assert (row["status"], row["attempt"], row["lease_owner"]) == ("running", 1, "w1")
    assert row["lease_expires_at"] == now + timedelta(seconds=30)


def test_claim_leaves_a_deferred_run_alone(db: Engine, store: RunStore) -> None:
    run_id = _enqueue(db, delay_s=60)
    assert store.claim(run_id, owner="w1", now=utc_now(), lease_s=30) is None


def test_finish_writes_state_and_lines_at_once(db: Engine, store: RunStore) -> None:
    run_id = _enqueue(db)
    claim = store.claim(run_id, owner="w1", now=utc_now(), lease_s=30)
    assert claim is not None
    lines = [
        _line(run_id, 1, 1, "first", {"k": [1, "x"]}),
        _line(run_id, 2, 1, "naïve ünïcode ✓", None),
    ]
    finished = store.finish(
        run_id,
        1,
        status="failed",
        now=utc_now(),
        result=None,
        error_type="ValueError",
        error="bad",
        exit_code=3,
        lines=lines,
    )
    assert finished.owned and finished.woken == ()
    with db.connect() as conn:
        run = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()
        stored = conn.execute(
            select(run_logs.c.seq, run_logs.c.message, run_logs.c.fields)
            .where(run_logs.c.run_id == run_id)
            .order_by(run_logs.c.seq)
        ).all()
    assert (run["status"], run["error_type"], run["error"], run["exit_code"]) == (
        "failed",
        "ValueError",
        "bad",
        3,
    )
    assert (run["lease_owner"], run["lease_expires_at"]) == (None, None)
    assert run["finished_at"] is not None
    assert [tuple(r) for r in stored] == [
        (1, "first", {"k": [1, "x"]}),
        (2, "naïve ünïcode ✓", None),
    ]


def test_finish_with_no_lines_and_a_result(db: Engine, store: RunStore) -> None:
    run_id = _enqueue(db)
    assert store.claim(run_id, owner="w1", now=utc_now(), lease_s=30) is not None
    assert store.finish(
        run_id,
        1,
        status="succeeded",
        now=utc_now(),
        result={"rows": [1, 2]},
        error_type=None,
        error=None,
        exit_code=None,
        lines=[],
    ).owned
    assert control.get_run(UnitOfWork(db), run_id).result == {"rows": [1, 2]}


def test_a_stale_attempt_cannot_finish_but_its_lines_are_kept(db: Engine, store: RunStore) -> None:
    """Fenced by attempt like runstore.finish; the lost attempt's lines stay, labelled."""
    run_id = _enqueue(db, max_attempts=2)
    first = store.claim(run_id, owner="w1", now=utc_now(), lease_s=30)
    assert first is not None
    with db.begin() as conn:  # the lease expired, another worker took the run
        conn.execute(runs.update().where(runs.c.id == run_id).values(lease_expires_at=utc_now()))
    second = store.claim(run_id, owner="w2", now=utc_now() + timedelta(seconds=1), lease_s=30)
    assert second is not None and second.attempt == 2
    finished = store.finish(
        run_id,
        1,
        status="succeeded",
        now=utc_now(),
        result={"late": True},
        error_type=None,
        error=None,
        exit_code=None,
        lines=[_line(run_id, 1, 1, "from attempt 1", None)],
    )
    assert not finished.owned
    run = control.get_run(UnitOfWork(db), run_id)
    assert (run.status, run.attempt, run.lease_owner, run.result) == ("running", 2, "w2", None)
    with db.connect() as conn:
        kept = conn.execute(
            select(run_logs.c.attempt, run_logs.c.message).where(run_logs.c.run_id == run_id)
        ).all()
    assert [tuple(r) for r in kept] == [(1, "from attempt 1")]


def test_finish_of_a_deleted_run_writes_no_lines(db: Engine, store: RunStore) -> None:
    """run_logs has no foreign key: the store itself keeps lines of a gone run out."""
    run_id = _enqueue(db)
    assert store.claim(run_id, owner="w1", now=utc_now(), lease_s=30) is not None
    with db.begin() as conn:
        assert run_lines.delete_runs(conn, [run_id]) == 1
    finished = store.finish(
        run_id,
        1,
        status="succeeded",
        now=utc_now(),
        result=None,
        error_type=None,
        error=None,
        exit_code=None,
        lines=[_line(run_id, 1, 1, "too late", None)],
    )
    assert not finished.owned
    with db.connect() as conn:
        lines = conn.execute(select(func.count()).where(run_logs.c.run_id == run_id)).scalar()
    assert lines == 0


def test_a_connection_the_server_dropped_is_replaced_before_the_next_claim(
    db: Engine, store: RunStore
) -> None:
    """The hot path keeps its own connection; once the server has dropped it (a restart, a
    killed backend), the next call sees that before using it and works on a new one, rather
    than failing on the dead one. (A connection that breaks during a call fails that call with
    the OperationalError callers retry on: tests/integration/test_driver_connections.py.)"""
    if not isinstance(store, PgRunStore):
        pytest.skip("only the prepared-statement store keeps connections of its own")
    first, second = _enqueue(db), _enqueue(db)
    assert store.claim(first, owner="w1", now=utc_now(), lease_s=30) is not None
    with db.begin() as conn:
        pids = (
            conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND application_name = 'conveyor' AND query LIKE '%UPDATE runs%'"
                )
            )
            .scalars()
            .all()
        )
        assert pids
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    def gone() -> bool:
        with db.connect() as conn:
            left = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                {"pids": list(pids)},
            ).scalar_one()
        return left == 0

    eventually(gone, timeout=10)
    claim = store.claim(second, owner="w1", now=utc_now(), lease_s=30)
    assert claim is not None and claim.run_id == second


def _outcome(seq: int, status: str = "completed", result: Any = None) -> steps.Outcome:
    now = utc_now()
    return steps.Outcome(
        seq=seq,
        name="call",
        occurrence=seq,
        step_type="step",
        started_at=now,
        finished_at=now,
        tries=seq,
        status=status,
        result=result,
    )


def test_a_step_is_recorded_only_while_its_attempt_owns_the_run(
    db: Engine, store: RunStore
) -> None:
    run_id = _enqueue(db, max_attempts=2)
    assert store.claim(run_id, owner="w1", now=utc_now(), lease_s=30) is not None
    assert store.record_step(run_id, 1, _outcome(1, result={"n": [1, "x"]}), reuse=False)
    assert store.record_step(run_id, 1, _outcome(2, status="failed"), reuse=False)
    # the failed step runs again and completes: the same row
    assert store.record_step(run_id, 1, _outcome(2, result="done"), reuse=True)
    assert not store.record_step(run_id, 2, _outcome(3), reuse=False)  # not attempt 2's run
    with db.connect() as conn:
        rows = conn.execute(
            select(run_steps.c.seq, run_steps.c.status, run_steps.c.result, run_steps.c.tries)
            .where(run_steps.c.run_id == run_id)
            .order_by(run_steps.c.seq)
        ).all()
    assert [tuple(r) for r in rows] == [
        (1, "completed", {"n": [1, "x"]}, 1),
        (2, "completed", "done", 2),
    ]


def _finish_holding(
    store: RunStore, run_id: uuid.UUID, slot: runstore.Slot | None, now: Any = None
) -> Any:
    """Attempt 1 of the run finishes (succeeded, no lines), handing on `slot`."""
    return store.finish(
        run_id,
        1,
        status="succeeded",
        now=now or utc_now(),
        result=None,
        error_type=None,
        error=None,
        exit_code=None,
        lines=[],
        slot=slot,
    )


def test_a_keyed_run_holds_its_slot_and_hands_it_on_as_it_finishes(
    kind: str, db: Engine, store: RunStore
) -> None:
    """The prepared claim takes a keyed run whose key has room, and the prepared finish hands
    the slot to the oldest waiter, each without a statement through SQLAlchemy."""
    first, second, third = (_enqueue(db, concurrency_key="repo:main") for _ in range(3))
    seen: list[str] = []
    event.listen(db, "before_cursor_execute", lambda *args: seen.append(args[2]))
    claim = store.claim(first, owner="w1", now=utc_now(), lease_s=30)
    assert isinstance(claim, runstore.Claim)
    assert (claim.concurrency_key, claim.concurrency_max) == ("repo:main", 1)
    if kind.startswith("pg"):
        assert seen == []  # one prepared statement on the driver
    for waiter in (second, third):
        refused = store.claim(waiter, owner="w2", now=utc_now(), lease_s=30)
        assert isinstance(refused, Refused) and refused.waits == "concurrency:repo:main"
    seen.clear()
    finished = _finish_holding(store, first, runstore.Slot("repo:main", 1, publishing=True))
    if kind.startswith("pg"):
        assert seen == []  # the finish and the refill: one pipelined transaction
    assert finished.owned
    assert [d.run_id for d in finished.woken] == [second]  # the oldest waiter, only
    assert finished.woken[0].priority == concurrency.HANDED_ON_PRIORITY
    handed = control.get_run(UnitOfWork(db), second)
    assert handed.dispatched_at is not None and handed.not_before <= utc_now()
    assert control.get_run(UnitOfWork(db), third).dispatched_at is None
    again = store.claim(second, owner="w2", now=utc_now(), lease_s=30)
    assert isinstance(again, runstore.Claim) and again.attempt == 1
    assert again.started_at >= control.get_run(UnitOfWork(db), first).finished_at


def test_a_finish_hands_on_no_slot_that_another_run_holds(db: Engine, store: RunStore) -> None:
    first, second = (_enqueue(db, concurrency_key="k", concurrency_max=2) for _ in range(2))
    waiter = _enqueue(db, concurrency_key="k", concurrency_max=2)
    for run_id in (first, second):
        assert isinstance(store.claim(run_id, owner="w", now=utc_now(), lease_s=30), runstore.Claim)
    assert isinstance(store.claim(waiter, owner="w", now=utc_now(), lease_s=30), Refused)
    slot = runstore.Slot("k", 2, publishing=False)
    finished = _finish_holding(store, first, slot)
    assert [d.run_id for d in finished.woken] == [waiter]
    assert control.get_run(UnitOfWork(db), waiter).dispatched_at is None  # the relay sends it
    # Its slot is kept for the woken run: a second finish of an unrelated holder frees one
    # more, and there is no one left to hand it to.
    assert _finish_holding(store, second, slot).woken == ()


def test_a_finish_that_lost_its_run_hands_on_nothing(db: Engine, store: RunStore) -> None:
    """Attempt 1's lease expired and attempt 2 holds the key: attempt 1's late finish must
    not free the slot (the key would run two at once)."""
    held = _enqueue(db, concurrency_key="k", max_attempts=2)
    waiter = _enqueue(db, concurrency_key="k")
    t0 = utc_now()
    assert isinstance(store.claim(held, owner="w1", now=t0, lease_s=1), runstore.Claim)
    later = t0 + timedelta(seconds=5)
    again = store.claim(held, owner="w2", now=later, lease_s=60)
    assert isinstance(again, runstore.Claim) and again.attempt == 2
    assert isinstance(store.claim(waiter, owner="w3", now=later, lease_s=60), Refused)
    finished = _finish_holding(store, held, runstore.Slot("k", 1, publishing=True), now=later)
    assert not finished.owned and finished.woken == ()
    assert control.get_run(UnitOfWork(db), waiter).status == "waiting"
