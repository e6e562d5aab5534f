"""Cost entries of runs with nothing to enforce go through the log writer: in batches, with the
run's totals in the same transaction, fenced by attempt, and all before the final state."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from structlog.testing import capture_logs

from domain.clock import utc_now
from domain.costs import ledger as costs
from domain.costs import projects
from domain.costs.prices import Prices
from domain.db.models import cost_entries, run_steps, runs
from domain.db.unit_of_work import UnitOfWork
from domain.runs import enqueue
from domain.runs import store as runstore
from domain.runs.requests import build_request
from tests.fakes import FakeClock
from tests.integration.conftest import Harness, harness
from worker.logwriter import LogWriter

DOWN_URL = "postgresql+psycopg://u@127.0.0.1:1/x"


def spend(
    writer: LogWriter,
    run_id: uuid.UUID,
    attempt: int,
    usd: str,
    *,
    tokens_in: int = 1,
    provider: str = "p",
) -> None:
    """One entry straight into the writer, as TaskContext.cost passes it."""
    writer.cost(
        run_id, attempt, None, "default", utc_now(), provider, "m", tokens_in, 0, 1, Decimal(usd)
    )


def ledger(engine: Engine, run_id: uuid.UUID) -> dict[str, Any]:
    """The run's totals beside the sums of its stored entries."""
    with engine.connect() as conn:
        run = conn.execute(
            select(runs.c.cost_usd, runs.c.tokens_in, runs.c.tokens_out, runs.c.requests_made)
            .where(runs.c.id == run_id)
        ).one()  # fmt: skip
        entries = conn.execute(
            select(
                cost_entries.c.cost_usd,
                cost_entries.c.tokens_in,
                cost_entries.c.tokens_out,
                cost_entries.c.requests,
                cost_entries.c.step_seq,
            ).where(cost_entries.c.run_id == run_id)
        ).all()
    return {
        "totals": (Decimal(run[0]), run[1], run[2], run[3]),
        "sums": (
            sum((Decimal(e[0]) for e in entries), Decimal(0)),
            sum(e[1] for e in entries),
            sum(e[2] for e in entries),
            sum(e[3] for e in entries),
        ),
        "entries": len(entries),
        "steps": [e[4] for e in entries],
    }


@pytest.fixture
def slow_flush(engine: Engine) -> Iterator[Harness]:
    """A worker whose writer flushes only when asked (or full): whatever reaches the database
    before the run's final state was written by the executor's own flush."""
    with harness(engine, flush_interval_s=3600, owner="slow-worker") as made:
        yield made


def test_buffered_entries_land_with_totals_equal_to_their_exact_sum(h: Harness) -> None:
    amounts = ["0.1", "0.2", "0.0000000001", "3.14159265358979", "0.00000000005", "7"]

    @h.registry.task()
    def spend(ctx) -> None:  # type: ignore[no-untyped-def]
        for i in range(300):
            ctx.cost(provider="openai", model="m", tokens_in=i, tokens_out=2, usd=amounts[i % 6])

    run_id = h.enqueue("spend")
    assert h.run(run_id) == "succeeded"
    got = ledger(h.engine, run_id)
    # Each entry is kept to 10 places, half up: 3.1415926536 and 0.0000000001 (from 5e-11).
    expected = 50 * Decimal("10.4415926538")
    assert got["entries"] == 300
    assert got["totals"] == got["sums"] == (expected, sum(range(300)), 600, 300)
    assert h.writer.stats["costs_written"] == 300  # they went through the writer
    usage = projects.show_project(UnitOfWork(h.engine), "default", now=utc_now())
    assert Decimal(usage["spent_usd"]) == expected
    assert usage["tokens"] == sum(range(300)) + 600


def test_costs_are_written_before_the_final_state(slow_flush: Harness) -> None:
    h = slow_flush

    @h.registry.task()
    def spend(ctx) -> None:  # type: ignore[no-untyped-def]
        for _ in range(50):
            ctx.cost(provider="p", model="m", tokens_in=1, usd="0.01")
            ctx.log("called")

    run_id = h.enqueue("spend")
    assert h.run(run_id) == "succeeded"
    # No flush was asked for and the interval is an hour: the executor's last write did it.
    assert h.writer.stats["flushes"] == 0
    assert h.writer.stats["buffered"] == 0
    got = ledger(h.engine, run_id)
    assert got["totals"] == got["sums"] == (Decimal("0.50"), 50, 0, 50)
    assert h.get(run_id).cost_usd == Decimal("0.50")


def test_a_retried_attempt_keeps_the_spend_of_the_first(slow_flush: Harness) -> None:
    h = slow_flush

    @h.registry.task()
    def flaky(ctx) -> None:  # type: ignore[no-untyped-def]
        ctx.cost(provider="p", model="m", usd="0.25")
        if ctx.attempt == 1:
            raise RuntimeError("try again")

    run_id = h.enqueue("flaky", max_attempts=2)
    assert h.run(run_id) == "retrying"
    with h.engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == run_id).values(not_before=utc_now()))
    assert h.run(run_id) == "succeeded"
    got = ledger(h.engine, run_id)
    assert got["totals"] == got["sums"] == (Decimal("0.50"), 0, 0, 2)


def test_entries_of_an_attempt_that_lost_the_run_are_dropped_with_a_warning(
    engine: Engine, clock: FakeClock
) -> None:
    run_id = enqueue.enqueue(UnitOfWork(engine, clock=clock), build_request(name="t")).run.id
    with engine.begin() as conn:
        claim = runstore.claim(conn, run_id, owner="w1", now=clock(), lease_s=30)
    assert claim is not None and claim.attempt == 1
    writer = LogWriter(engine, clock=clock)
    spend(writer, run_id, 1, "0.30", tokens_in=10)
    writer.log(run_id, 1, "written anyway")
    # Another worker reclaims the run (lease expired): attempt 2 owns it now.
    with engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == run_id).values(attempt=2))
    spend(writer, run_id, 2, "0.05", tokens_in=10)
    with capture_logs() as events:
        writer.flush()
    got = ledger(engine, run_id)
    assert got["totals"] == got["sums"] == (Decimal("0.05"), 10, 0, 1)
    assert got["entries"] == 1
    [dropped] = [e for e in events if e["event"] == "logwriter.costs_dropped"]
    assert dropped["log_level"] == "warning"
    assert (dropped["entries"], dropped["usd"]) == (1, "0.30")
    assert dropped["runs"] == [f"{run_id} attempt 1"]
    stats = writer.stats
    assert (stats["costs_written"], stats["costs_dropped"], stats["lines_written"]) == (1, 1, 1)
    assert stats["buffered"] == 0
    writer.close()


def test_runs_with_a_budget_record_each_cost_at_once_and_stop(h: Harness) -> None:
    seen: list[Decimal] = []

    @h.registry.task()
    def spend(ctx) -> None:  # type: ignore[no-untyped-def]
        for usd in ("0.60", "0.50", "0.10"):
            ctx.cost(provider="p", model="m", usd=usd)
            seen.append(h.get(ctx.run_id).cost_usd)  # already in the database

    run_id = h.enqueue("spend", budget_usd="1.00")
    assert h.run(run_id) == "budget_exceeded"
    assert seen == [Decimal("0.60")]  # the second call stopped the run; no third
    error = h.get(run_id).error or ""  # PostgreSQL prints the column's scale: 1.0000000000
    assert "budget_usd 1." in error and "exceeded by 0.10" in error
    got = ledger(h.engine, run_id)
    assert got["totals"] == got["sums"] == (Decimal("1.10"), 0, 0, 2)
    assert h.writer.stats["costs_written"] == 0

    run_id = h.enqueue("spend", max_requests=1)
    assert h.run(run_id) == "budget_exceeded"
    assert "max_requests 1 exceeded (2 made)" in (h.get(run_id).error or "")
    assert h.writer.stats["costs_written"] == 0


def test_a_project_limit_or_an_open_reservation_records_at_once(h: Harness) -> None:
    projects.add_project(UnitOfWork(h.engine), "capped", monthly_tokens=1_000, now=utc_now())
    seen: list[int] = []

    @h.registry.task()
    def spend(ctx, reserve: bool) -> None:  # type: ignore[no-untyped-def]
        if reserve:
            with ctx.reserve(usd="0.10"):
                ctx.cost(provider="p", model="m", tokens_in=600, usd="0.01")
                seen.append(h.get(ctx.run_id).tokens_in)
            ctx.cost(provider="p", model="m", tokens_in=1, usd="0.01")  # buffered again
            return
        for _ in range(3):
            ctx.cost(provider="p", model="m", tokens_in=600, usd="0.01")
            seen.append(h.get(ctx.run_id).tokens_in)

    capped = h.enqueue("spend", params={"reserve": False}, project="capped")
    assert h.run(capped) == "budget_exceeded"
    assert seen == [600]  # the second call went over the project's 1,000 tokens and stopped
    assert "monthly token limit 1000 exceeded by 200 tokens" in (h.get(capped).error or "")
    assert h.writer.stats["costs_written"] == 0

    seen.clear()
    reserving = h.enqueue("spend", params={"reserve": True})
    assert h.run(reserving) == "succeeded"
    assert seen == [600]
    assert h.writer.stats["costs_written"] == 1  # only the one after the block
    got = ledger(h.engine, reserving)
    assert got["totals"] == got["sums"] == (Decimal("0.02"), 601, 0, 2)


def test_price_table_warning_and_steps_work_through_the_buffer(h: Harness, tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(
        '[openai."gpt-4o-mini"]\ninput_per_million = "0.15"\noutput_per_million = "0.60"\n'
    )
    h.executor.prices = Prices.load(prices)

    @h.registry.task()
    def agent(ctx) -> None:  # type: ignore[no-untyped-def]
        with ctx.step("plan"):
            ctx.cost(provider="openai", model="gpt-4o-mini", tokens_in=1000, tokens_out=333)
        with ctx.step("act"):
            ctx.cost(provider="acme", model="mystery", tokens_in=10, tokens_out=10)

    run_id = h.enqueue("agent")
    assert h.run(run_id) == "succeeded"
    got = ledger(h.engine, run_id)
    # 1000 x 0.15/1M + 333 x 0.60/1M = 0.00034980, exactly; the unknown model costs 0.
    assert got["totals"] == got["sums"] == (Decimal("0.0003498"), 1010, 343, 2)
    assert h.writer.stats["costs_written"] == 2
    with h.engine.connect() as conn:
        steps = dict(
            conn.execute(
                select(run_steps.c.name, run_steps.c.seq).where(run_steps.c.run_id == run_id)
            ).all()
        )
    assert got["steps"] == [steps["plan"], steps["act"]]
    assert ("log", "no price for acme/mystery: recorded with cost 0") in h.messages(run_id)


def test_a_full_buffer_of_costs_makes_callers_wait_instead_of_dropping(
    engine: Engine, clock: FakeClock
) -> None:
    run_id = enqueue.enqueue(UnitOfWork(engine, clock=clock), build_request(name="t")).run.id
    writer = LogWriter(engine, flush_interval_s=60, max_buffered=10, clock=clock)
    writer.start()
    peak = 0
    for _ in range(200):
        spend(writer, run_id, 0, "0.001")
        peak = max(peak, writer.stats["buffered"])
    writer.close()
    assert peak <= 10
    got = ledger(engine, run_id)
    assert got["totals"] == got["sums"] == (Decimal("0.200"), 200, 0, 200)


def test_a_database_outage_at_the_end_keeps_the_costs_buffered() -> None:
    from domain.db.engine import create_db_engine

    down = create_db_engine(DOWN_URL)
    writer = LogWriter(down)
    run_id = uuid.uuid4()
    spend(writer, run_id, 1, "0.5")
    with capture_logs() as events:
        assert writer.take_run(run_id) == ([], [])
    [deferred] = [e for e in events if e["event"] == "logwriter.costs_deferred"]
    assert deferred["entries"] == 1
    assert writer.stats["buffered"] == 1  # not lost: the flusher keeps trying
    down.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_refused_entry_costs_only_itself_and_totals_still_match(
    engine: Engine, clock: FakeClock
) -> None:
    run_id = enqueue.enqueue(UnitOfWork(engine, clock=clock), build_request(name="t")).run.id
    writer = LogWriter(engine, clock=clock)
    for i, provider in enumerate(["p", "p", "x" * 101, "p"]):  # varchar(100) refuses one
        spend(writer, run_id, 0, "0.1", tokens_in=i, provider=provider)
    with capture_logs() as events:
        writer.flush()
    got = ledger(engine, run_id)
    assert got["totals"] == got["sums"] == (Decimal("0.3"), 0 + 1 + 3, 0, 3)
    assert writer.stats["rows_rejected"] == 1
    assert [e["rows"] for e in events if e["event"] == "logwriter.rows_rejected"] == [1]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(cost_entries)).scalar_one() == 3
    writer.close()


def test_bad_names_and_request_counts_are_refused_before_anything_is_written(
    h: Harness,
) -> None:
    cases = {
        "empty": {"provider": ""},
        "long": {"model": "m" * 201},
        "requests": {"requests": 2**31},
        "huge": {"usd": "1e9"},
    }

    @h.registry.task()
    def bad(ctx, case: str) -> None:  # type: ignore[no-untyped-def]
        ctx.cost(**{"provider": "p", "model": "m", "usd": "0.1", **cases[case]})

    errors = {}
    for case in cases:
        run_id = h.enqueue("bad", params={"case": case})
        assert h.run(run_id) == "failed"
        errors[case] = h.get(run_id).error or ""
    assert "provider: must be non-empty text of at most 100 characters" in errors["empty"]
    assert "model: must be non-empty text of at most 200 characters" in errors["long"]
    assert "requests: must be a whole number from 0 to 2,147,483,647" in errors["requests"]
    assert "usd: one entry must be under 1e9 USD" in errors["huge"]
    with h.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(cost_entries)).scalar_one() == 0


def test_a_limit_set_mid_run_is_checked_from_the_next_run(h: Harness) -> None:
    projects.add_project(UnitOfWork(h.engine), "late", now=utc_now())

    @h.registry.task()
    def spend(ctx, set_limit: bool) -> None:  # type: ignore[no-untyped-def]
        ctx.cost(provider="p", model="m", tokens_in=600, usd="0.01")
        if set_limit:
            projects.set_limits(UnitOfWork(h.engine), "late", monthly_tokens=1_000, now=utc_now())
        ctx.cost(provider="p", model="m", tokens_in=600, usd="0.01")

    first = h.enqueue("spend", params={"set_limit": True}, project="late")
    assert h.run(first) == "succeeded"  # decided at its first cost: no limit then
    assert h.writer.stats["costs_written"] == 2
    usage = projects.show_project(UnitOfWork(h.engine), "late", now=utc_now())
    assert usage["tokens"] == 1_200  # counted all the same
    with pytest.raises(costs.MonthlyLimitReached):
        h.enqueue("spend", params={"set_limit": False}, project="late")
