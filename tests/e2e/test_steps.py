"""Durable steps with real worker processes on each database (SQLite and PostgreSQL) and Redis: a
worker killed with -9 after step 2 of 4 completed leaves steps 1-2 done, and the next attempt runs
only 3-4, with exactly one cost entry per step; sleepers hold no slot; children survive a kill."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from conveyor import Client
from domain.db.models import cost_entries, run_signals, run_steps, runs
from tests.e2e.stack import Stack, with_scheduler
from tests.polling import consistently, eventually
from tests.services import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def stack(db_url: str, redis_server: PrivateRedis, tmp_path: Path) -> Iterator[Stack]:
    with with_scheduler(db_url, redis_server.url(12), tmp_path) as s:  # its reaper recovers
        yield s


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_kill_9_after_step_2_of_4_runs_only_steps_3_and_4_again(
    stack: Stack, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    victim = stack.worker("steps", name="victim", concurrency=1)
    with stack.client() as client:
        run = client.enqueue("four_paid_steps", {"marks": str(marks), "hold": 30}, queue="steps")
        eventually(lambda: "after step 2" in _lines(marks), timeout=60)
        stack.kill(victim, signal.SIGKILL)  # the worker and its child, between steps 2 and 3
        rescuer = stack.worker("steps", name="rescuer", concurrency=1)
        try:
            final = client.wait(run.id, timeout=90)
        finally:
            stack.kill(rescuer, signal.SIGTERM)
        assert (final.status, final.attempt) == ("succeeded", 2)
        assert final.result == ["output 1", "output 2", "output 3", "output 4"]
        key = f"{run.id}:call"
        assert _lines(marks) == [
            f"call 1 attempt 1 key {key}:1",
            f"call 2 attempt 1 key {key}:2",
            "after step 2",
            f"call 3 attempt 2 key {key}:3",
            f"call 4 attempt 2 key {key}:4",
        ]
        with client.engine.connect() as conn:
            entries = conn.execute(
                select(cost_entries.c.tokens_in).where(cost_entries.c.run_id == run.id)
            ).scalars()
            steps = conn.execute(
                select(run_steps.c.occurrence, run_steps.c.status, run_steps.c.attempt)
                .where(run_steps.c.run_id == run.id)
                .order_by(run_steps.c.seq)
            ).all()
        assert sorted(entries) == [10, 20, 30, 40]  # one paid call per step, never twice
        assert [tuple(s) for s in steps] == [
            (1, "completed", 1),
            (2, "completed", 1),
            (3, "completed", 2),
            (4, "completed", 2),
        ]
        assert client.get(run.id).cost_usd == Decimal("0.04")


def test_200_runs_sleeping_2_s_each_share_2_worker_slots(stack: Stack) -> None:
    """Held workers would need 200 x 2 s / 2 slots = 200 s; asleep, the runs hold none and
    all finish within a minute."""
    worker = stack.worker("naps", name="nappers", concurrency=2)
    try:
        with stack.client() as client:
            made = client.enqueue_many(
                {"name": "naps", "params": {"seconds": 2}, "queue": "naps"} for _ in range(200)
            )
            ids = [r.id for r in made]

            def finished() -> int:
                with client.engine.connect() as conn:
                    done = conn.execute(
                        select(runs.c.id).where(runs.c.id.in_(ids), runs.c.status == "succeeded")
                    ).all()
                return len(done)

            eventually(lambda: finished() == 200, timeout=60)
            with client.engine.connect() as conn:
                rows = conn.execute(
                    select(runs.c.attempt, runs.c.started_at, runs.c.finished_at).where(
                        runs.c.id.in_(ids)
                    )
                ).all()
        assert {r.attempt for r in rows} == {1}
        assert min((r.finished_at - r.started_at).total_seconds() for r in rows) >= 2.0
    finally:
        stack.kill(worker, signal.SIGTERM)


def test_500_children_survive_a_kill_9_with_no_duplicate_and_one_parent_result(
    stack: Stack, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    victim = stack.worker("kids", name="victim", concurrency=2)
    with stack.client() as client:
        parent = client.enqueue("parent_of_many", {"marks": str(marks), "n": 500}, queue="kids")
        eventually(lambda: _lines(marks), timeout=60)  # spawned; children are running
        stack.kill(victim, signal.SIGKILL)
        rescuer = stack.worker("kids", name="rescuer", concurrency=2)
        try:
            final = client.wait(parent.id, timeout=120)
        finally:
            stack.kill(rescuer, signal.SIGTERM)
        assert final.status == "succeeded"
        assert final.result == sum(i * i for i in range(500))
        with client.engine.connect() as conn:
            kids = conn.execute(
                select(runs.c.status, runs.c.idempotency_key).where(
                    runs.c.parent_run_id == parent.id
                )
            ).all()
        assert len(kids) == 500 and len({k.idempotency_key for k in kids}) == 500
        assert {k.status for k in kids} == {"succeeded"}


def test_killing_the_worker_and_the_scheduler_during_a_sleep_changes_nothing(
    stack: Stack,
) -> None:
    worker = stack.worker("naps", name="napper", concurrency=1)
    with stack.client() as client:
        run = client.enqueue("naps", {"seconds": 4}, queue="naps")
        eventually(lambda: client.get(run.id).status == "waiting", timeout=30)
        leader = next(p for p in stack.procs if "scheduler" in map(str, p.args))
        stack.kill(worker, signal.SIGKILL)
        stack.kill(leader, signal.SIGKILL)
        stack.scheduler()
        rescuer = stack.worker("naps", name="napper2", concurrency=1)
        try:
            final = client.wait(run.id, timeout=60)
        finally:
            stack.kill(rescuer, signal.SIGTERM)
        assert (final.status, final.attempt, final.result) == ("succeeded", 1, "rested")
        assert final.finished_at is not None and final.started_at is not None
        assert (final.finished_at - final.started_at).total_seconds() >= 4
        steps = client.steps(run.id)
        assert [(s.name, s.status) for s in steps] == [("sleep", "completed")]


def test_a_step_that_raises_twice_succeeds_on_its_third_try_in_attempt_1(
    stack: Stack, tmp_path: Path
) -> None:
    marks = tmp_path / "tries"
    stack.worker("steps", name="worker", concurrency=1)
    with stack.client() as client:
        run = client.enqueue("flaky_step", {"marks": str(marks)}, queue="steps")
        final = client.wait(run.id, timeout=60)
        assert (final.status, final.attempt, final.result) == ("succeeded", 1, "answer")
        assert _lines(marks) == ["try 1", "try 2", "try 3"]
        [step] = client.steps(run.id)
        assert (step.name, step.status, step.tries, step.occurrence) == ("call", "completed", 3, 1)


def test_a_retry_that_reaches_another_step_fails_naming_both(stack: Stack) -> None:
    stack.worker("steps", name="worker", concurrency=1)
    with stack.client() as client:
        run = client.enqueue("changes_course", queue="steps")
        final = client.wait(run.id, timeout=60)
        assert (final.status, final.attempt, final.error_type) == (
            "failed",
            2,
            "NonDeterministicStep",
        )
        assert final.error is not None
        assert "plan" in final.error and "draft" in final.error


def test_signals_before_and_after_the_wait_once_per_key_and_a_wait_that_times_out(
    stack: Stack, tmp_path: Path
) -> None:
    with stack.client() as client:
        early = client.enqueue("awaits_approval", queue="steps")
        client.signal(early.id, "approval", {"by": "ann"}, key="k1")  # before any worker
        assert not client.signal(early.id, "approval", {"by": "ann"}, key="k1").new
        stack.worker("steps", name="worker", concurrency=1)
        eventually(lambda: _waits_again(client, early.id), timeout=60)
        sent = subprocess.run(
            [sys.executable, "-m", "conveyor", "runs", "signal", str(early.id), "approval",
             "--payload-json", '{"by": "bob"}', "--key", "k2"],
            env=stack.env, capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.strip() == f"signal approval sent to {early.id}"
        final = client.wait(early.id, timeout=60)
        assert (final.status, final.attempt) == ("succeeded", 1)
        assert final.result == [{"by": "ann"}, {"by": "bob"}]
        refused = subprocess.run(
            [sys.executable, "-m", "conveyor", "runs", "signal", str(early.id), "approval"],
            env=stack.env, capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert refused.returncode != 0
        assert "already ended as succeeded" in refused.stderr
        assert "Traceback" not in refused.stderr

        late = client.enqueue("awaits_approval", {"timeout": 1.5}, queue="steps")
        final = client.wait(late.id, timeout=60)
        assert (final.status, final.error_type) == ("failed", "WaitTimeout")


def _waits_again(client: Client, run_id: uuid.UUID) -> bool:
    """The run took the first approval and now waits for the second."""
    with client.engine.connect() as conn:
        taken = conn.execute(
            select(run_signals.c.consumed_at).where(run_signals.c.run_id == run_id)
        ).scalar_one()
    return taken is not None and client.get(run_id).status == "waiting"


def test_cancelling_a_waiting_parent_ends_it_and_its_unfinished_children(stack: Stack) -> None:
    stack.worker("steps,kids", name="worker", concurrency=2)
    with stack.client() as client:
        parent = client.enqueue("parent_of_slow", {"n": 5}, queue="steps")

        def kids() -> list[Any]:
            with client.engine.connect() as conn:
                return list(
                    conn.execute(select(runs.c.status).where(runs.c.parent_run_id == parent.id))
                )

        eventually(
            lambda: (
                client.get(parent.id).status == "waiting"
                and [k.status for k in kids()] == ["waiting"] * 5
            ),
            timeout=60,
        )
        client.cancel(parent.id, reason="plan rejected")
        assert client.get(parent.id).status == "cancelled"  # at once, no worker involved
        assert [k.status for k in kids()] == ["cancelled"] * 5
        consistently(lambda: client.get(parent.id).status == "cancelled", 2)
