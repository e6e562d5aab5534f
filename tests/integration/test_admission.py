"""Issue 16, item 7: budgets hold at claim. A queued run of a project at its monthly limit, or
of a parent that spent its budget, never starts: it ends budget_exceeded naming the limit, or,
with on_limit = hold, stays pending until the limit allows it. On SQLite (runstore.claim) and
PostgreSQL (the executor's prepared fast path, falling back to runstore for runs with limits)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import Engine, Table, func, select

from domain.clock import utc_now
from domain.costs import ledger as costs
from domain.costs import projects
from domain.costs.admission import HOLD_RECHECK_S
from domain.db.engine import create_db_engine
from domain.db.models import cost_entries
from domain.db.models_platform import Pipeline
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput
from domain.pipelines import store as pipeline_store
from domain.runs import store as runstore
from tests.fakes import FakeClock
from tests.integration.conftest import Harness
from tests.pipeline_support import copy_fixtures, pipeline_harness, shared_env_cache

pipelines = cast(Table, Pipeline.__table__)


def _tasks(h: Harness) -> list[uuid.UUID]:
    """`spend` records one cost of `usd`; `started` notes every run whose code ran."""
    started: list[uuid.UUID] = []

    @h.registry.task()
    def spend(ctx, usd: str) -> None:  # type: ignore[no-untyped-def]
        started.append(ctx.run_id)
        ctx.cost(provider="p", model="m", usd=usd)

    return started


def _entries(engine: Engine, run_id: uuid.UUID) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(select(func.count()).where(cost_entries.c.run_id == run_id)).scalar_one()
        )


def test_a_queued_run_of_a_project_at_its_limit_ends_without_starting(h: Harness) -> None:
    started = _tasks(h)
    projects.add_project(UnitOfWork(h.engine), "acme", monthly_cost_usd="0.05", now=utc_now())
    first = h.enqueue("spend", params={"usd": "0.05"}, project="acme")
    queued = h.enqueue("spend", params={"usd": "0.01"}, project="acme")  # before the limit
    assert h.run(first) == "succeeded"

    assert h.run(queued) == "budget_exceeded"
    run = h.get(queued)
    assert started == [first]  # its code never ran
    assert (run.status, run.attempt, run.started_at, run.cost_usd) == (
        "budget_exceeded",
        0,
        None,
        Decimal(0),
    )
    assert run.error_type == "BudgetExceeded"
    assert (
        f"project 'acme' has spent 0.05 USD of its 0.05 USD monthly limit in {utc_now():%Y-%m}"
        in (run.error or "")
    )
    assert _entries(h.engine, queued) == 0
    assert projects.show_project(UnitOfWork(h.engine), "acme", now=utc_now())["spent_usd"] == "0.05"
    assert h.run(queued) == "dropped"  # a redelivery finds it ended


def test_the_token_limit_stops_a_queued_run_too(h: Harness) -> None:
    @h.registry.task()
    def chat(ctx) -> None:  # type: ignore[no-untyped-def]
        ctx.cost(provider="p", model="m", tokens_in=60, tokens_out=40, usd="0")

    projects.add_project(UnitOfWork(h.engine), "words", monthly_tokens=100, now=utc_now())
    first, queued = (h.enqueue("chat", project="words") for _ in range(2))
    assert h.run(first) == "succeeded"
    assert h.run(queued) == "budget_exceeded"
    assert "project 'words' has used 100 of its 100 monthly tokens" in (h.get(queued).error or "")


def test_a_project_below_its_limit_and_one_without_limits_start_as_before(h: Harness) -> None:
    started = _tasks(h)
    projects.add_project(UnitOfWork(h.engine), "roomy", monthly_cost_usd="1.00", now=utc_now())
    limited = h.enqueue("spend", params={"usd": "0.99"}, project="roomy")
    free = h.enqueue("spend", params={"usd": "5"})
    assert (h.run(limited), h.run(free)) == ("succeeded", "succeeded")
    assert started == [limited, free]


def test_hold_keeps_the_run_queued_until_the_limit_is_raised(h: Harness) -> None:
    started = _tasks(h)
    projects.add_project(
        UnitOfWork(h.engine), "patient", monthly_cost_usd="0.05", on_limit="hold", now=utc_now()
    )
    first = h.enqueue("spend", params={"usd": "0.05"}, project="patient")
    queued = h.enqueue("spend", params={"usd": "0.01"}, project="patient")
    clock = FakeClock(utc_now())
    h.executor.clock = clock
    assert h.run(first) == "succeeded"

    assert h.run(queued) == "held"
    run = h.get(queued)
    assert (run.status, run.attempt, run.started_at) == ("pending", 0, None)
    assert run.not_before == clock() + timedelta(seconds=HOLD_RECHECK_S)
    assert "project 'patient' has spent 0.05 USD of its 0.05 USD monthly limit" in (run.error or "")
    assert "held: checked again at" in (run.error or "")
    assert h.run(queued) == "dropped"  # not due yet: a stray redelivery holds no worker

    clock.advance(HOLD_RECHECK_S)
    assert h.run(queued) == "held"  # due again, still at the limit: held again
    projects.set_limits(UnitOfWork(h.engine), "patient", monthly_cost_usd="0.10", now=clock())
    clock.advance(HOLD_RECHECK_S)
    assert h.run(queued) == "succeeded"
    assert started == [first, queued]
    assert h.get(queued).error is None


def test_hold_lets_the_run_start_when_the_month_changes(h: Harness) -> None:
    started = _tasks(h)
    now = utc_now()
    next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    clock = FakeClock(next_month - timedelta(seconds=10))  # the month's last seconds
    h.executor.clock = clock
    projects.add_project(UnitOfWork(h.engine), "monthly", monthly_cost_usd="0.05", now=now)
    projects.set_limits(UnitOfWork(h.engine), "monthly", on_limit="hold", now=now)
    first = h.enqueue("spend", params={"usd": "0.05"}, project="monthly")
    queued = h.enqueue("spend", params={"usd": "0.01"}, project="monthly")
    assert h.run(first) == "succeeded"
    assert h.run(queued) == "held"
    assert h.get(queued).not_before == next_month  # re-checked as the month turns, not later

    clock.now = next_month
    assert h.run(queued) == "succeeded"
    assert started == [first, queued]
    assert (
        projects.show_project(UnitOfWork(h.engine), "monthly", now=next_month)["spent_usd"]
        == "0.01"
    )


def test_a_parent_that_spent_its_budget_stops_its_child(h: Harness) -> None:
    started = _tasks(h)
    parent = h.enqueue("spend", params={"usd": "0.05"}, budget_usd="0.05")
    assert h.run(parent) == "succeeded"  # spent exactly its budget
    child = h.enqueue("spend", params={"usd": "0.01"}, parent_run_id=parent, triggered_by="chain")
    assert h.run(child) == "budget_exceeded"
    assert f"parent run {parent} has spent 0.05 USD of its 0.05 USD budget_usd" in (
        h.get(child).error or ""
    )
    # A retry is asked for with a budget of its own: its previous run does not stop it.
    again = h.enqueue("spend", params={"usd": "0.01"}, parent_run_id=parent, triggered_by="retry")
    assert h.run(again) == "succeeded"
    # A parent with budget left does not stop its child either.
    roomy = h.enqueue("spend", params={"usd": "0.01"}, budget_usd="0.05")
    assert h.run(roomy) == "succeeded"
    kid = h.enqueue("spend", params={"usd": "0.01"}, parent_run_id=roomy, triggered_by="chain")
    assert h.run(kid) == "succeeded"
    assert started == [parent, again, roomy, kid]


def test_a_run_whose_lease_expired_is_checked_again_when_reclaimed(h: Harness) -> None:
    """A worker died mid-run and the month reached its limit meanwhile: the next claim of the
    run does not start it again."""
    _tasks(h)
    projects.add_project(UnitOfWork(h.engine), "crash", monthly_cost_usd="0.05", now=utc_now())
    lost = h.enqueue("spend", params={"usd": "0.01"}, project="crash", max_attempts=2)
    first = h.enqueue("spend", params={"usd": "0.05"}, project="crash")
    now = utc_now()
    with h.engine.begin() as conn:
        assert runstore.claim(conn, lost, owner="dead", now=now, lease_s=1) is not None
    assert h.run(first) == "succeeded"
    h.executor.clock = FakeClock(now + timedelta(seconds=5))
    assert h.run(lost) == "budget_exceeded"
    run = h.get(lost)
    assert (run.status, run.attempt) == ("budget_exceeded", 1)
    assert "monthly limit" in (run.error or "")


def test_on_limit_is_stop_by_default_and_shown(engine: Engine) -> None:
    now = utc_now()
    made = projects.add_project(UnitOfWork(engine), "p", monthly_cost_usd="1", now=now)
    assert made["on_limit"] == "stop"
    assert (
        projects.set_limits(UnitOfWork(engine), "p", on_limit="hold", now=now)["on_limit"] == "hold"
    )
    assert [p["on_limit"] for p in projects.list_projects(UnitOfWork(engine), now=now)] == [
        "stop",
        "hold",
    ]
    with pytest.raises(InvalidInput, match=r"on_limit: must be one of stop, hold \(got 'wait'\)"):
        projects.set_limits(UnitOfWork(engine), "p", on_limit="wait", now=now)
    assert (
        projects.show_project(UnitOfWork(engine), "p", now=now)["on_limit"] == "hold"
    )  # nothing written


def test_a_pipeline_run_refused_at_claim_counts_as_its_pipelines_failure(
    sqlite_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    engine = create_db_engine(sqlite_url)
    cache = shared_env_cache(tmp_path_factory)
    try:
        with pipeline_harness(engine, tmp_path / "p", cache, tmp_path / "a") as h:
            copy_fixtures(h.root, "test_simple")
            pipeline_store.sync(engine, h.runner.directory)  # as a worker does at start
            projects.add_project(UnitOfWork(engine), "acme", monthly_cost_usd="0.05", now=utc_now())
            run_id = h.enqueue("test_simple", project="acme")
            with engine.begin() as conn:  # the month reaches its limit while the run is queued
                costs.add_usage(conn, "acme", costs.month_of(utc_now()), usd=Decimal("0.05"))
            assert h.run(run_id) == "budget_exceeded"
            with engine.connect() as conn:
                counters = conn.execute(
                    select(pipelines.c.total_runs, pipelines.c.failed_runs).where(
                        pipelines.c.name == "test_simple"
                    )
                ).one()
            assert tuple(counters) == (1, 1)
            assert h.lines(run_id) == []  # its process never started
    finally:
        engine.dispose()
