"""Signals (`ctx.wait_for`, `signals.send`) on a real executor and database: a wait holds no
worker, a signal sent before the wait is kept for it, a key is accepted once, a wait times
out, a wake-up cannot be missed, and a run that has ended refuses signals."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import select, update

from domain.clock import utc_now
from domain.db.models import Run, run_signals, runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, InvalidInput, RunNotFound
from domain.runs import signals
from domain.security.audit import list_entries
from tests.integration.conftest import Harness


def _send(h: Harness, run_id: uuid.UUID, name: str, payload: Any = None, **kw: Any) -> Any:
    return signals.send(UnitOfWork(h.engine), run_id, name, payload, actor="test", **kw)


def _row(h: Harness, run_id: uuid.UUID) -> Any:
    with h.engine.connect() as conn:
        return conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()


def _approval_task(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def approve(ctx: Any) -> Any:
        plan = ctx.step("plan", lambda: {"steps": 3})
        decision = ctx.wait_for("approval", timeout="1h")
        return {"plan": plan, "decision": decision}


def test_a_wait_holds_no_worker_and_a_signal_makes_the_run_go_on(h: Harness) -> None:
    _approval_task(h)
    run_id = h.enqueue("approve")
    assert h.run(run_id) == "waiting"
    row = _row(h, run_id)
    assert (row["status"], row["wait_reason"], row["lease_owner"]) == (
        "waiting",
        "signal:approval",
        None,
    )
    assert row["not_before"] > utc_now()  # due at the timeout, unless a signal comes
    assert h.run(run_id) == "dropped"
    sent = _send(h, run_id, "approval", {"ok": True, "by": "ana"})
    assert sent.new and _row(h, run_id)["not_before"] <= utc_now()  # due now
    assert h.run(run_id) == "succeeded"
    assert h.get(run_id).result == {"plan": {"steps": 3}, "decision": {"ok": True, "by": "ana"}}
    audit = list_entries(UnitOfWork(h.engine), action="run.signal").items
    assert [(e.target_id, e.details) for e in audit] == [
        (str(run_id), {"name": "approval", "key": None})
    ]


def test_a_signal_sent_before_the_wait_is_kept_for_it(h: Harness) -> None:
    _approval_task(h)
    run_id = h.enqueue("approve")
    _send(h, run_id, "approval", "yes")  # the run has not even started
    assert h.run(run_id) == "succeeded"
    assert h.get(run_id).result["decision"] == "yes"


def test_a_repeated_key_is_accepted_once_and_signals_are_consumed_in_order(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def collect(ctx: Any) -> list[Any]:
        return [ctx.wait_for("vote") for _ in range(2)]

    run_id = h.enqueue("collect")
    first = _send(h, run_id, "vote", "a", key="k1")
    again = _send(h, run_id, "vote", "a-again", key="k1")
    assert (first.new, again.new, again.id) == (True, False, first.id)
    assert h.run(run_id) == "waiting"  # one vote so far: waits for the second
    _send(h, run_id, "vote", "b", key="k2")
    assert h.run(run_id) == "succeeded"
    assert h.get(run_id).result == ["a", "b"]
    with h.engine.connect() as conn:
        kept = conn.execute(select(run_signals.c.key).order_by(run_signals.c.id)).scalars().all()
    assert kept == ["k1", "k2"]


def test_a_wait_that_times_out_raises_wait_timeout(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def patient(ctx: Any) -> str:
        try:
            ctx.wait_for("never", timeout="1h")
        except Exception as exc:
            return type(exc).__name__
        return "signalled"

    run_id = h.enqueue("patient")
    assert h.run(run_id) == "waiting"
    # The timeout passes: the run is due, and its wait (the deadline is in its step) ends.
    with h.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(not_before=utc_now()))
        conn.execute(run_signals.select().where(run_signals.c.run_id == run_id))  # none were sent
    _expire_deadline(h, run_id)
    assert h.run(run_id) == "succeeded"
    assert h.get(run_id).result == "WaitTimeout"


def _expire_deadline(h: Harness, run_id: uuid.UUID) -> None:
    """Move the recorded deadline of the run's wait into the past (time passing)."""
    from domain.db.models import run_steps

    past = {"deadline": utc_now().isoformat()}
    with h.engine.begin() as conn:
        conn.execute(
            update(run_steps)
            .where(run_steps.c.run_id == run_id, run_steps.c.name == "wait_for:never")
            .values(result=past)
        )


def test_a_signal_sent_while_the_run_goes_to_wait_is_not_missed(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal lands after the wait looked for one and before the run was written
    waiting: the suspend finds it and makes the run due."""

    @h.registry.task(max_attempts=1)
    def racer(ctx: Any) -> Any:
        return ctx.wait_for("go")

    original = signals.take

    def take_then_signal(conn: Any, run_id: uuid.UUID, name: str, *, now: Any) -> Any:
        got = original(conn, run_id, name, now=now)  # none yet
        monkeypatch.setattr(signals, "take", original)
        conn.commit()  # the wait's own transaction ends here, as the signal is sent
        _send(h, run_id, "go", "late but here")
        return got

    run_id = h.enqueue("racer")
    monkeypatch.setattr(signals, "take", take_then_signal)
    assert h.run(run_id) == "waiting"
    assert _row(h, run_id)["not_before"] <= utc_now()  # due at once, not at a timeout
    assert h.run(run_id) == "succeeded"
    assert h.get(run_id).result == "late but here"


def test_signalling_a_run_that_ended_or_does_not_exist_is_refused(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def quick(ctx: Any) -> None:
        return None

    run_id = h.enqueue("quick")
    assert h.run(run_id) == "succeeded"
    with pytest.raises(Conflict, match="already ended as succeeded"):
        _send(h, run_id, "approval")
    with pytest.raises(RunNotFound):
        _send(h, uuid.uuid4(), "approval")
    with pytest.raises(InvalidInput, match="signal name"):
        _send(h, run_id, "bad name!")
    with pytest.raises(InvalidInput, match="payload: not JSON"):
        _send(h, run_id, "approval", object())
    with h.engine.connect() as conn:
        assert conn.execute(select(run_signals.c.id)).all() == []
