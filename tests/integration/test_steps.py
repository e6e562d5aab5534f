"""Checkpointed steps (`ctx.step(name, fn)`) on a real executor and database: a later attempt
returns what earlier attempts completed without calling it again, retries in place, keeps the
order, fences by attempt, and shows each step's tries, cost and whether it was replayed."""

from __future__ import annotations

import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, update

from domain.clock import utc_now
from domain.db.models import Run, cost_entries, run_steps
from domain.db.unit_of_work import UnitOfWork
from domain.runs.reads import run_detail
from tests.integration.conftest import Harness


def _due_now(h: Harness, run_id: uuid.UUID) -> None:
    """The retry's backoff is over, without waiting for it."""
    with h.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(not_before=utc_now()))


def _steps(h: Harness, run_id: uuid.UUID) -> list[dict[str, Any]]:
    with h.engine.connect() as conn:
        rows = conn.execute(
            select(
                run_steps.c.name,
                run_steps.c.occurrence,
                run_steps.c.status,
                run_steps.c.attempt,
                run_steps.c.tries,
                run_steps.c.result,
            )
            .where(run_steps.c.run_id == run_id)
            .order_by(run_steps.c.seq)
        ).mappings()
        return [dict(r) for r in rows]


def test_a_retried_run_returns_completed_steps_without_calling_them(h: Harness) -> None:
    calls: Counter[str] = Counter()
    keys: list[str] = []

    def fetch(n: int) -> dict[str, Any]:
        calls["fetch"] += 1
        return {"rows": list(range(n)), "pair": (1, 2)}

    def summarize(doc: int, ctx: Any) -> str:
        calls[f"summarize:{doc}"] += 1
        keys.append(ctx.step_key)
        return f"summary {doc}"

    @h.registry.task(max_attempts=2, retry_backoff=60.0)
    def agent(ctx: Any) -> dict[str, Any]:
        fetched = ctx.step("fetch", fetch, 3)
        summaries = [ctx.step("summarize", summarize, doc, ctx) for doc in fetched["rows"]]
        if ctx.attempt == 1:
            raise RuntimeError("the model provider is down")
        return {"fetched": fetched, "summaries": summaries}

    run_id = h.enqueue("agent")
    assert h.run(run_id) == "retrying"
    _due_now(h, run_id)
    assert h.run(run_id) == "succeeded"
    # Each step ran once, across both attempts; the second attempt got the stored results.
    assert calls == {"fetch": 1, "summarize:0": 1, "summarize:1": 1, "summarize:2": 1}
    result = h.get(run_id).result
    assert result == {
        "fetched": {"rows": [0, 1, 2], "pair": [1, 2]},  # what JSON keeps, on both attempts
        "summaries": ["summary 0", "summary 1", "summary 2"],
    }
    assert keys == [f"{run_id}:summarize:{n}" for n in (1, 2, 3)]
    rows = _steps(h, run_id)
    assert [(r["name"], r["occurrence"], r["status"], r["attempt"]) for r in rows] == [
        ("fetch", 1, "completed", 1),
        ("summarize", 1, "completed", 1),
        ("summarize", 2, "completed", 1),
        ("summarize", 3, "completed", 1),
    ]
    detail = run_detail(UnitOfWork(h.engine), run_id).to_dict()
    assert [s["replayed"] for s in detail["steps"]] == [True, True, True, True]


def test_a_step_interrupted_before_it_completed_runs_again_with_the_same_key(h: Harness) -> None:
    keys: list[str] = []

    def charge(ctx: Any) -> str:
        keys.append(ctx.step_key)
        if ctx.attempt == 1:
            raise RuntimeError("connection reset while charging")
        return "charged"

    @h.registry.task(max_attempts=2, retry_backoff=60.0)
    def pay(ctx: Any) -> str:
        return str(ctx.step("charge", charge, ctx))

    run_id = h.enqueue("pay")
    assert h.run(run_id) == "retrying"
    _due_now(h, run_id)
    assert h.run(run_id) == "succeeded"
    assert keys == [f"{run_id}:charge:1"] * 2
    (row,) = _steps(h, run_id)
    assert (row["status"], row["attempt"], row["tries"], row["result"]) == (
        "completed",
        2,
        2,
        "charged",
    )


def test_a_step_retries_in_place_without_failing_the_attempt(h: Harness) -> None:
    tries: list[int] = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionError(f"try {len(tries)} failed")
        return "ok"

    @h.registry.task(max_attempts=1)
    def job(ctx: Any) -> str:
        return str(ctx.step("call", flaky, retries=2, backoff=0.01))

    run_id = h.enqueue("job")
    assert h.run(run_id) == "succeeded"
    run = h.get(run_id)
    assert (run.attempt, run.result) == (1, "ok")
    (row,) = _steps(h, run_id)
    assert (row["status"], row["tries"]) == ("completed", 3)


def test_a_step_that_keeps_failing_fails_the_attempt_after_its_retries(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def job(ctx: Any) -> None:
        ctx.step("call", _always_fails, retries=1, backoff="10ms")

    run_id = h.enqueue("job")
    assert h.run(run_id) == "failed"
    assert h.get(run_id).error_type == "ConnectionError"
    (row,) = _steps(h, run_id)
    assert (row["status"], row["tries"], row["occurrence"]) == ("failed", 2, 1)


def _always_fails() -> None:
    raise ConnectionError("still down")


def test_reaching_steps_in_another_order_fails_the_run_and_says_which(h: Harness) -> None:
    @h.registry.task(max_attempts=3, retry_backoff=60.0)
    def job(ctx: Any) -> None:
        first, second = ("a", "b") if ctx.attempt == 1 else ("b", "a")
        ctx.step(first, lambda: 1)
        ctx.step(second, lambda: 2)
        if ctx.attempt == 1:
            raise RuntimeError("fail after both steps")

    run_id = h.enqueue("job")
    assert h.run(run_id) == "retrying"
    _due_now(h, run_id)
    assert h.run(run_id) == "failed"  # not retried again: the third attempt would do the same
    run = h.get(run_id)
    assert run.error_type == "NonDeterministicStep"
    assert "step 'b' (occurrence 1) was reached where the run's history has step 'a'" in str(
        run.error
    )


def test_a_replayed_step_records_no_cost_and_a_run_step_carries_its_own(h: Harness) -> None:
    def call_model(ctx: Any, tokens: int) -> int:
        ctx.cost("openai", "gpt-4o-mini", tokens_in=tokens, usd="0.01")
        return tokens

    @h.registry.task(max_attempts=2, retry_backoff=60.0)
    def job(ctx: Any) -> None:
        ctx.step("plan", call_model, ctx, 100)
        ctx.step("write", call_model, ctx, 200)
        if ctx.attempt == 1:
            raise RuntimeError("fail after paying for two steps")

    run_id = h.enqueue("job")
    assert h.run(run_id) == "retrying"
    _due_now(h, run_id)
    assert h.run(run_id) == "succeeded"
    h.writer.flush()
    with h.engine.connect() as conn:
        entries = conn.execute(
            select(cost_entries.c.step_seq, cost_entries.c.tokens_in).where(
                cost_entries.c.run_id == run_id
            )
        ).all()
    assert sorted(tokens for _, tokens in entries) == [100, 200]  # one entry per step, ever
    detail = run_detail(UnitOfWork(h.engine), run_id).to_dict()
    steps = {s["name"]: s for s in detail["steps"]}
    assert {name: Decimal(s["cost_usd"]) for name, s in steps.items()} == {
        "plan": Decimal("0.01"),
        "write": Decimal("0.01"),
    }
    assert detail["totals"]["cost_usd"] == "0.0200000000"


def test_a_step_completion_is_fenced_by_attempt(h: Harness) -> None:
    """An attempt that lost its run records no result over the attempt that replaced it."""

    def overtaken() -> str:
        with h.engine.begin() as conn:  # another worker took the run meanwhile
            conn.execute(update(Run).where(Run.id == run_id).values(attempt=Run.attempt + 1))
        return "late"

    @h.registry.task(max_attempts=3)
    def job(ctx: Any) -> None:
        ctx.step("slow", overtaken)

    run_id = h.enqueue("job")
    assert h.run(run_id) == "lease_lost"
    assert _steps(h, run_id) == []  # the overtaken attempt wrote no row, let alone a result


def test_checkpointed_steps_do_not_nest_and_results_must_be_json(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def nested(ctx: Any) -> None:
        ctx.step("outer", lambda: ctx.step("inner", lambda: 1))

    @h.registry.task(max_attempts=1)
    def opaque(ctx: Any) -> None:
        ctx.step("object", object)

    first, second = h.enqueue("nested"), h.enqueue("opaque")
    assert h.run(first) == "failed"
    assert "cannot be nested" in str(h.get(first).error)
    assert h.run(second) == "failed"
    assert "step 'object' returned object, which is not JSON" in str(h.get(second).error)


@pytest.mark.parametrize("where", ["outside", "arguments"])
def test_misuse_is_a_clear_error(h: Harness, where: str) -> None:
    @h.registry.task(max_attempts=1)
    def job(ctx: Any) -> None:
        if where == "outside":
            ctx.step_key  # noqa: B018 - the property raises
        else:
            with ctx.step("visible", 1):
                pass

    run_id = h.enqueue("job")
    assert h.run(run_id) == "failed"
    expected = "only inside a checkpointed step" if where == "outside" else "is not a function"
    assert expected in str(h.get(run_id).error)


def test_planned_steps_are_not_planned_again_once_checkpointed(h: Harness) -> None:
    @h.registry.task(max_attempts=2, retry_backoff=60.0)
    def job(ctx: Any) -> None:
        ctx.plan("one", "two")
        ctx.step("one", lambda: 1)
        ctx.step("two", lambda: 2)
        if ctx.attempt == 1:
            raise RuntimeError("again")

    run_id = h.enqueue("job")
    assert h.run(run_id) == "retrying"
    _due_now(h, run_id)
    assert h.run(run_id) == "succeeded"
    rows = _steps(h, run_id)
    assert [(r["name"], r["status"], r["occurrence"]) for r in rows] == [
        ("one", "completed", 1),
        ("two", "completed", 1),
    ]
