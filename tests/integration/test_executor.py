"""The executor on a real database: outcomes, records, retries, stops, and fencing."""

from __future__ import annotations

import logging
import threading
import uuid

from sqlalchemy import func, select, update

from domain.clock import utc_now
from domain.db.models import CostEntry, Run, run_logs, run_steps
from domain.db.unit_of_work import UnitOfWork
from domain.runs import control
from domain.runs import store as runstore
from tests.integration.conftest import Harness
from tests.polling import eventually


def test_success_records_result_logs_steps_and_metrics(h: Harness) -> None:
    @h.registry.task()
    def report(ctx, customer_id: int) -> dict[str, int]:  # type: ignore[no-untyped-def]
        with ctx.step("fetch"):
            ctx.log("fetching", customer_id=customer_id)
            print("printed line")
            logging.getLogger("app").warning("std logging line")
        ctx.metric("rows", 120, table="orders")
        return {"rows": 120, "customer": customer_id}

    run_id = h.enqueue("report", params={"customer_id": 7})
    assert h.get(run_id).params == {"customer_id": 7}  # validated at enqueue
    assert h.run(run_id) == "succeeded"
    run = h.get(run_id)
    assert run.result == {"rows": 120, "customer": 7}
    assert (run.attempt, run.lease_owner, run.error) == (1, None, None)
    assert run.finished_at is not None and run.started_at is not None
    assert h.messages(run_id) == [
        ("log", "fetching"),
        ("stdout", "printed line"),
        ("log", "std logging line"),
    ]
    with h.engine.connect() as conn:
        step = conn.execute(select(run_steps).where(run_steps.c.run_id == run_id)).mappings().one()
        metric = conn.execute(
            select(func.count()).select_from(run_logs.metadata.tables["run_metrics"])
        ).scalar_one()
    assert (step["name"], step["status"]) == ("fetch", "completed")
    assert metric == 1


def test_second_delivery_is_dropped(h: Harness) -> None:
    calls: list[int] = []

    @h.registry.task()
    def once(ctx) -> None:  # type: ignore[no-untyped-def]
        calls.append(1)

    run_id = h.enqueue("once")
    assert h.run(run_id) == "succeeded"
    assert h.run(run_id) == "dropped"
    assert calls == [1]
    assert h.executor.duplicates_dropped == 1


def test_failures_retry_with_backoff_then_fail(h: Harness) -> None:
    @h.registry.task(max_attempts=3, retry_backoff=40.0, retry_backoff_max=60.0)
    def broken(ctx) -> None:  # type: ignore[no-untyped-def]
        raise ValueError(f"boom on attempt {ctx.attempt}")

    def delay_s(run_id: uuid.UUID) -> float:
        pending = h.get(run_id)
        assert pending.status == "pending" and pending.error_type == "ValueError"
        assert pending.not_before is not None
        return (pending.not_before - utc_now()).total_seconds()

    def time_passes(run_id: uuid.UUID) -> None:  # the backoff is over without waiting for it
        with h.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == run_id).values(not_before=utc_now()))

    run_id = h.enqueue("broken")
    assert h.run(run_id) == "retrying"
    assert 15 < delay_s(run_id) <= 40  # base 40 s with equal jitter: between 20 and 40 s
    assert h.run(run_id) == "dropped"  # not due yet: the backoff holds
    time_passes(run_id)
    assert h.run(run_id) == "retrying"
    assert 25 < delay_s(run_id) <= 60  # doubled to 80 s, capped at 60: between 30 and 60 s
    assert h.run(run_id) == "dropped"
    time_passes(run_id)
    assert h.run(run_id) == "failed"
    run = h.get(run_id)
    assert (run.status, run.attempt, run.error_type) == ("failed", 3, "ValueError")
    assert run.error is not None and "boom on attempt 3" in run.error and "Traceback" in run.error


def test_unknown_task_and_bad_params_fail_without_retry(h: Harness) -> None:
    @h.registry.task(max_attempts=5)
    def typed(ctx, n: int) -> None:  # type: ignore[no-untyped-def]
        pass

    ghost = h.enqueue("ghost", validate=False, max_attempts=5)
    assert h.run(ghost) == "failed"
    assert h.get(ghost).error_type == "UnknownTask"
    bad = h.enqueue("typed", validate=False, params={"n": "x"})
    assert h.run(bad) == "failed"
    run = h.get(bad)
    assert run.error_type == "InvalidInput" and "params.n" in (run.error or "")


def test_result_that_is_not_json_and_exception_that_cannot_be_printed(h: Harness) -> None:
    class Weird(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    @h.registry.task()
    def returns_object(ctx) -> object:  # type: ignore[no-untyped-def]
        return {"when": object()}

    @h.registry.task()
    def raises_weird(ctx) -> None:  # type: ignore[no-untyped-def]
        raise Weird()

    a = h.enqueue("returns_object")
    assert h.run(a) == "failed"
    assert h.get(a).error_type == "ResultNotSerializable"
    b = h.enqueue("raises_weird")
    assert h.run(b) == "failed"
    assert "Weird" in (h.get(b).error_type or "")


def test_cancel_a_running_run(h: Harness) -> None:
    started = threading.Event()

    @h.registry.task()
    def loop(ctx) -> None:  # type: ignore[no-untyped-def]
        started.set()
        while True:
            ctx.check_cancel()
            ctx.wait(0.02)

    run_id = h.enqueue("loop")
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(h.run(run_id)))
    runner.start()
    assert started.wait(5)
    control.cancel_run(UnitOfWork(h.engine), run_id, actor="test")
    runner.join(10)
    assert outcome == ["cancelled"]
    run = h.get(run_id)
    assert (run.status, run.error_type) == ("cancelled", "RunCancelled")


def test_timeout_cooperative_and_stuck(h: Harness) -> None:
    @h.registry.task(timeout=0.3)
    def polite(ctx) -> None:  # type: ignore[no-untyped-def]
        while not ctx.wait(0.02):
            pass
        ctx.check_cancel()

    release = threading.Event()

    @h.registry.task(timeout=0.2)
    def stuck(ctx) -> str:  # type: ignore[no-untyped-def]
        release.wait(10)  # ignores every stop
        return "late"

    a = h.enqueue("polite")
    assert h.run(a) == "timed_out"
    assert h.get(a).error_type == "RunTimedOut"

    b = h.enqueue("stuck")
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(h.run(b)))
    runner.start()
    eventually(
        lambda: h.get(b).status not in {"pending", "running"},
        timeout=5,
        every=0.05,
        what="the stuck run's end recorded",
    )
    run = h.get(b)
    assert run.status == "timed_out"  # recorded while the code is still stuck
    assert "grace period" in (run.error or "")
    release.set()
    runner.join(5)
    assert outcome == ["lease_lost"]  # its late result cannot overwrite the recorded state
    assert h.get(b).status == "timed_out" and h.get(b).result is None


def test_budget_and_request_limits_stop_the_run(h: Harness) -> None:
    @h.registry.task()
    def spend(ctx, calls: int) -> None:  # type: ignore[no-untyped-def]
        for _ in range(calls):
            ctx.cost(
                provider="openai", model="gpt-4o-mini", tokens_in=1000, tokens_out=100, usd="0.40"
            )

    a = h.enqueue("spend", params={"calls": 5}, budget_usd="1.00")
    assert h.run(a) == "budget_exceeded"
    run = h.get(a)
    assert str(run.cost_usd).rstrip("0") == "1.2"  # stopped on the third call, 3 x 0.40
    assert (run.tokens_in, run.requests_made) == (3000, 3)
    assert run.error is not None and "budget_usd 1" in run.error and "exceeded by 0.2" in run.error
    b = h.enqueue("spend", params={"calls": 5}, max_requests=2)
    assert h.run(b) == "budget_exceeded"
    assert "max_requests 2 exceeded" in (h.get(b).error or "")
    with h.engine.connect() as conn:
        entries = conn.execute(
            select(func.count()).select_from(CostEntry.__table__).where(CostEntry.run_id == a)
        ).scalar_one()
    assert entries == 3


def test_a_stale_attempt_cannot_finish(h: Harness) -> None:
    """The worker's lease expired and another attempt took the run: the first one's result is
    refused (fenced by attempt) and the monitor told it to stop."""
    go_on = threading.Event()

    @h.registry.task(max_attempts=2)
    def slow(ctx) -> str:  # type: ignore[no-untyped-def]
        go_on.wait(5)
        return f"attempt {ctx.attempt}"

    run_id = h.enqueue("slow", max_attempts=2)
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(h.run(run_id)))
    runner.start()
    eventually(
        lambda: h.get(run_id).status == "running",
        timeout=10,
        every=0.01,
        what="the first attempt running",
    )
    started = h.get(run_id).started_at
    with h.engine.begin() as conn:  # the reaper's view: lease gone, another worker claims
        conn.execute(
            runstore.runs.update()
            .where(runstore.runs.c.id == run_id)
            .values(lease_expires_at=started)
        )
        assert runstore.claim(conn, run_id, owner="other", now=utc_now(), lease_s=30) is not None
    go_on.set()
    runner.join(5)
    assert outcome == ["lease_lost"]
    run = h.get(run_id)
    assert (run.status, run.attempt, run.lease_owner) == ("running", 2, "other")


def test_planned_steps_move_through_running_to_completed(h: Harness) -> None:
    """plan() then step(): on SQLite too (a nested connection there would wait on itself)."""

    @h.registry.task()
    def job(ctx) -> None:  # type: ignore[no-untyped-def]
        ctx.plan("fetch", "write")
        with ctx.step("fetch"):
            pass
        with ctx.step("extra"):
            pass

    run_id = h.enqueue("job")
    assert h.run(run_id) == "succeeded"
    with h.engine.connect() as conn:
        rows = conn.execute(
            select(run_steps.c.seq, run_steps.c.name, run_steps.c.status)
            .where(run_steps.c.run_id == run_id)
            .order_by(run_steps.c.seq)
        ).all()
    assert [tuple(r) for r in rows] == [
        (1, "fetch", "completed"),
        (2, "write", "planned"),
        (3, "extra", "completed"),
    ]
