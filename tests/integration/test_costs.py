"""Issue 8's ledger and budgets on real databases: prices, project limits, reservations under
concurrency, exact reports, and refusals with the reason."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update

from domain.clock import utc_now
from domain.costs import ledger as costs
from domain.costs import projects, reservations
from domain.costs import reports as cost_reports
from domain.costs.prices import Prices
from domain.db.models import cost_entries, runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ConfigurationError, InvalidInput
from domain.runs import recovery
from tests.integration.conftest import Harness


def test_price_table_computes_cost_and_unknown_models_cost_zero(h: Harness, tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(
        '[openai."gpt-4o-mini"]\ninput_per_million = "0.15"\noutput_per_million = "0.60"\n'
    )
    h.executor.prices = Prices.load(prices)

    @h.registry.task()
    def call(ctx) -> None:  # type: ignore[no-untyped-def]
        ctx.cost(provider="openai", model="gpt-4o-mini", tokens_in=1_000_000, tokens_out=500_000)
        ctx.cost(provider="acme", model="mystery", tokens_in=10, tokens_out=10)

    run_id = h.enqueue("call")
    assert h.run(run_id) == "succeeded"
    run = h.get(run_id)
    assert run.cost_usd == Decimal("0.45")  # 0.15 + 0.5 x 0.60, exactly
    assert (run.tokens_in, run.tokens_out, run.requests_made) == (1_000_010, 500_010, 2)
    assert ("log", "no price for acme/mystery: recorded with cost 0") in h.messages(run_id)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '[x."m"]\ninput_per_million = "1"\noutput_per_million = "1"\ncurrency = "EUR"\n',
            "prices are in USD",
        ),
        ('[x."m"]\ninput_per_million = "1"\n', "missing 'output_per_million'"),
        ('[x."m"]\ninput_per_million = "-1"\noutput_per_million = "1"\n', "non-negative"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_price_tables_are_clear(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        Prices.load(path)


def test_bad_costs_fail_the_run_with_the_reason(h: Harness) -> None:
    cases = {"negative": {"usd": "-1"}, "text": {"usd": "lots"}, "huge": {"tokens_in": 2**64}}

    @h.registry.task()
    def bad(ctx, case: str) -> None:  # type: ignore[no-untyped-def]
        ctx.cost(provider="p", model="m", **cases[case])

    messages = {}
    for case in cases:
        run_id = h.enqueue("bad", params={"case": case})
        assert h.run(run_id) == "failed"
        messages[case] = h.get(run_id).error or ""
    assert "usd: must be a non-negative amount" in messages["negative"]
    assert "usd: 'lots' is not a number" in messages["text"]
    assert "tokens_in: must be a whole number from 0 to 2^63-1" in messages["huge"]


def test_project_limits_stop_runs_and_refuse_new_ones(h: Harness) -> None:
    projects.add_project(UnitOfWork(h.engine), "acme", monthly_cost_usd="1.00", now=utc_now())

    @h.registry.task()
    def spend(ctx, usd: str) -> None:  # type: ignore[no-untyped-def]
        ctx.cost(provider="p", model="m", usd=usd)

    first = h.enqueue("spend", params={"usd": "0.60"}, project="acme")
    assert h.run(first) == "succeeded"
    second = h.enqueue("spend", params={"usd": "0.65"}, project="acme")
    assert h.run(second) == "budget_exceeded"
    assert "project 'acme' monthly cost limit 1.00" in (h.get(second).error or "")
    assert "exceeded by 0.25" in (h.get(second).error or "")
    with pytest.raises(costs.MonthlyLimitReached, match="new runs are refused"):
        h.enqueue("spend", params={"usd": "0.01"}, project="acme")
    assert h.enqueue("spend", params={"usd": "0.01"})  # other projects are unaffected
    assert projects.show_project(UnitOfWork(h.engine), "acme", now=utc_now())["spent_usd"] == "1.25"


def test_reserving_more_than_the_run_has_left_is_refused(h: Harness) -> None:
    @h.registry.task()
    def plan(ctx) -> None:  # type: ignore[no-untyped-def]
        ctx.cost(provider="p", model="m", usd="0.70")
        with ctx.reserve(usd="0.50"):
            ctx.cost(provider="p", model="m", usd="0.50")

    run_id = h.enqueue("plan", budget_usd="1.00")
    assert h.run(run_id) == "budget_exceeded"
    run = h.get(run_id)
    assert "reserving 0.50 USD exceeds the run's remaining budget of 0.30" in (run.error or "")
    assert run.cost_usd == Decimal("0.70")  # stopped before the money was spent


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_twenty_runs_racing_never_exceed_the_monthly_limit(h: Harness) -> None:
    """Each run reserves 0.10 before spending 0.10; the limit fits exactly ten of them."""
    projects.add_project(UnitOfWork(h.engine), "racing", monthly_cost_usd="1.00", now=utc_now())
    barrier = threading.Barrier(20)

    @h.registry.task()
    def agent(ctx) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        with ctx.reserve(usd="0.10", tokens=1000):
            ctx.cost(provider="p", model="m", tokens_in=500, tokens_out=500, usd="0.10")

    ids = [h.enqueue("agent", project="racing") for _ in range(20)]
    outcomes: list[str] = []
    threads = [threading.Thread(target=lambda r=r: outcomes.append(h.run(r))) for r in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["budget_exceeded"] * 10 + ["succeeded"] * 10
    with h.engine.connect() as conn:
        spent = conn.execute(
            select(func.sum(cost_entries.c.cost_usd)).where(cost_entries.c.project == "racing")
        ).scalar_one()
    assert Decimal(spent) == Decimal("1.00")  # exactly the limit, never more
    usage = projects.show_project(UnitOfWork(h.engine), "racing", now=utc_now())
    assert (usage["spent_usd"], usage["reserved_usd"], usage["tokens"]) == ("1", "0", 10_000)


def test_spend_inside_a_reservation_settles_it_at_once(h: Harness) -> None:
    """Money spent inside reserve() stops counting as reserved in the same transaction, so a
    run reserving meanwhile is judged on what is really committed (was: counted twice)."""
    projects.add_project(UnitOfWork(h.engine), "settle", monthly_cost_usd="1.00", now=utc_now())
    spent, go_on = threading.Event(), threading.Event()

    @h.registry.task()
    def first(ctx) -> None:  # type: ignore[no-untyped-def]
        with ctx.reserve(usd="0.30", tokens=100):
            ctx.cost(provider="p", model="m", tokens_in=40, tokens_out=20, usd="0.10")
            spent.set()
            go_on.wait(10)

    @h.registry.task()
    def second(ctx) -> None:  # type: ignore[no-untyped-def]
        with ctx.reserve(usd="0.70"):  # 0.10 spent + 0.20 still held + 0.70 = the limit
            ctx.cost(provider="p", model="m", tokens_in=1, tokens_out=1, usd="0.70")

    a = h.enqueue("first", project="settle")
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(h.run(a)))
    runner.start()
    assert spent.wait(10)
    usage = projects.show_project(UnitOfWork(h.engine), "settle", now=utc_now())
    assert (usage["spent_usd"], usage["reserved_usd"]) == ("0.1", "0.2")
    assert h.run(h.enqueue("second", project="settle")) == "succeeded"
    go_on.set()
    runner.join(10)
    assert outcome == ["succeeded"]
    usage = projects.show_project(UnitOfWork(h.engine), "settle", now=utc_now())
    assert (usage["spent_usd"], usage["reserved_usd"], usage["tokens"]) == ("0.8", "0", 62)


def test_reports_sum_exactly_to_the_ledger(h: Harness) -> None:
    @h.registry.task()
    def many(ctx, n: int) -> None:  # type: ignore[no-untyped-def]
        for i in range(n):
            ctx.cost(
                provider="openai" if i % 2 else "anthropic",
                model=f"m{i % 3}",
                tokens_in=i,
                tokens_out=1,
                usd="0.0000001",
            )

    for n in (7, 13):
        assert h.run(h.enqueue("many", params={"n": n})) == "succeeded"
    for by in ("provider", "model", "name", "day", "project"):
        rows = cost_reports.report(UnitOfWork(h.engine), by=by)
        assert sum((r["cost_usd"] for r in rows), Decimal(0)) == Decimal("0.0000020")
        assert sum(r["entries"] for r in rows) == 20
    by_provider = {
        r["provider"]: r["cost_usd"]
        for r in cost_reports.report(UnitOfWork(h.engine), by="provider")
    }
    assert by_provider == {"anthropic": Decimal("0.0000011"), "openai": Decimal("0.0000009")}
    with pytest.raises(InvalidInput, match="by: expected one of"):
        cost_reports.report(UnitOfWork(h.engine), by="colour")


def test_project_input_errors(engine: Engine) -> None:
    now = utc_now()
    with pytest.raises(InvalidInput, match="a limit of zero would refuse all work"):
        projects.add_project(UnitOfWork(engine), "z", monthly_cost_usd="0", now=now)
    with pytest.raises(InvalidInput, match="monthly_tokens: a positive whole number"):
        projects.add_project(UnitOfWork(engine), "z", monthly_tokens=-5, now=now)
    with pytest.raises(InvalidInput, match="name: "):
        projects.add_project(UnitOfWork(engine), "a/b", now=now)
    projects.add_project(UnitOfWork(engine), "z", now=now)
    from domain.errors import Conflict

    with pytest.raises(Conflict, match="already exists"):
        projects.add_project(UnitOfWork(engine), "z", now=now)
    assert [p["name"] for p in projects.list_projects(UnitOfWork(engine), now=now)] == [
        "default",
        "z",
    ]


def test_the_reaper_gives_back_what_a_lost_attempt_had_reserved(h: Harness) -> None:
    """An attempt whose worker died inside reserve() never released it: the reaper settles it
    when it takes the run back (re-queued or failed), and leaves a live run's reservation."""
    projects.add_project(UnitOfWork(h.engine), "held", monthly_cost_usd="1.00", now=utc_now())

    @h.registry.task(max_attempts=2)
    def spends(ctx) -> None:  # type: ignore[no-untyped-def]
        """Never run here: the test plays the worker that died."""

    requeued, failed, alive = (h.enqueue("spends", project="held") for _ in range(3))
    now = utc_now()
    for run_id in (requeued, failed, alive):
        reservations.reserve(h.engine, run_id, "held", usd=Decimal("0.25"), tokens=10, now=now)
    expired = now - timedelta(seconds=1)
    with h.engine.begin() as conn:
        for run_id, attempt, lease in [(requeued, 1, expired), (failed, 2, expired),
                                       (alive, 1, now + timedelta(minutes=5))]:  # fmt: skip
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(status="running", attempt=attempt, lease_owner="w", lease_expires_at=lease)
            )
    assert projects.show_project(UnitOfWork(h.engine), "held", now=now)["reserved_usd"] == "0.75"
    assert recovery.reap_once(h.engine, clock=lambda: now) == (1, 1)
    usage = projects.show_project(UnitOfWork(h.engine), "held", now=now)
    assert (usage["reserved_usd"], usage["spent_usd"]) == ("0.25", "0")  # the live run's only
    assert h.get(requeued).status == "pending" and h.get(failed).status == "failed"
