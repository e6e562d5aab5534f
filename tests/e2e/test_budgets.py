"""Issue 16, item 7, in small and for real: queued runs against a monthly limit, on a worker
process with two slots. Measured before: every queued run started and paid at least once after
the month had reached its limit; now a run does not start once it has."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from domain.clock import utc_now
from domain.costs import projects
from domain.db.models import cost_entries, runs
from domain.db.unit_of_work import UnitOfWork
from tests.e2e.stack import Stack
from tests.polling import eventually
from tests.services import PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

RUNS, CALLS = 12, 2
CALL_USD = Decimal("0.01")
LIMIT_USD = Decimal("0.05")
CONCURRENCY = 2


@pytest.fixture
def stack(pg_url: str, redis_server: PrivateRedis, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(pg_url, tmp_path, redis_server.url(9))
    s.redis.flushdb()
    s.worker("default", name="budgets", concurrency=CONCURRENCY)
    yield s
    s.stop_all()


def _runs(engine: Engine, ids: list[Any]) -> list[Any]:
    """Each run's status, started_at, error and number of cost entries."""
    entries = select(func.count()).where(cost_entries.c.run_id == runs.c.id).scalar_subquery()
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(runs.c.status, runs.c.started_at, runs.c.error, entries).where(
                    runs.c.id.in_(ids)
                )
            ).all()
        )


def test_queued_runs_stop_at_the_monthly_limit_before_spending(stack: Stack) -> None:
    with stack.client() as client:
        projects.add_project(
            UnitOfWork(client.engine), "capped", monthly_cost_usd=str(LIMIT_USD), now=utc_now()
        )
        item = {"name": "llm_calls", "params": {"calls": CALLS}, "project": "capped"}
        ids = [r.id for r in client.enqueue_many(item for _ in range(RUNS))]
        eventually(
            lambda: all(r.status not in ("pending", "running") for r in _runs(client.engine, ids)),
            timeout=60,
            every=0.2,
        )
        rows = _runs(client.engine, ids)
        with client.engine.connect() as conn:
            spent = conn.execute(
                select(func.sum(cost_entries.c.cost_usd)).where(cost_entries.c.project == "capped")
            ).scalar_one()
    # A run checks the month after each call and no run starts once the month is at its
    # limit, so past the limit only the runs then in flight (one per slot) pay one call each.
    in_flight = CONCURRENCY * CALL_USD
    assert LIMIT_USD <= Decimal(spent) <= LIMIT_USD + in_flight
    paid = [r for r in rows if r[3] > 0]
    assert len(paid) <= (LIMIT_USD + in_flight) / CALL_USD  # each paid at least one call
    refused = [r for r in rows if r[3] == 0]
    assert len(refused) == RUNS - len(paid) >= RUNS - 7
    for run in refused:
        assert (run.status, run.started_at) == ("budget_exceeded", None)
        assert "project 'capped' has spent" in (run.error or "")
        assert "of its 0.05 USD monthly limit" in (run.error or "")
