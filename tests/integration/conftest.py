"""Shared fixtures for integration tests: a real executor on a real database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, select

from domain.costs.prices import Prices
from domain.db.engine import create_db_engine
from domain.db.models import run_logs
from domain.db.unit_of_work import UnitOfWork
from domain.runs import control, enqueue
from domain.runs.requests import build_request
from domain.runs.views import RunView
from domain.tasks.registry import Registry, RegistryCatalog
from worker import capture
from worker.executor import Executor
from worker.logwriter import LogWriter
from worker.monitor import RunMonitor


@dataclass
class Harness:
    engine: Engine
    registry: Registry
    executor: Executor
    writer: LogWriter

    def enqueue(self, name: str, validate: bool = True, **fields: Any) -> uuid.UUID:
        catalog = RegistryCatalog(self.registry) if validate else None
        request = build_request(name=name, **fields)
        return enqueue.enqueue(UnitOfWork(self.engine), request, catalog=catalog).run.id

    def run(self, run_id: uuid.UUID) -> str:
        return self.executor.execute(run_id).status

    def get(self, run_id: uuid.UUID) -> RunView:
        return control.get_run(UnitOfWork(self.engine), run_id)

    def messages(self, run_id: uuid.UUID) -> list[tuple[str, str]]:
        self.writer.flush()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(run_logs.c.stream, run_logs.c.message)
                .where(run_logs.c.run_id == run_id)
                .order_by(run_logs.c.seq)
            ).all()
        return [(r[0], r[1]) for r in rows]


@contextmanager
def harness(
    engine: Engine,
    *,
    flush_interval_s: float = 0.05,
    owner: str = "test-worker",
    prices: Prices | None = None,
) -> Iterator[Harness]:
    """An in-process worker (writer, monitor, executor) on `engine`, closed afterwards."""
    registry = Registry()
    writer = LogWriter(engine, flush_interval_s=flush_interval_s)
    writer.start()
    capture.install()
    holder: list[Executor] = []
    monitor = RunMonitor(
        engine,
        lease_s=30,
        tick_s=0.1,
        kill_grace_s=0.3,
        on_abandon=lambda ctx: holder[0].abandon(ctx),  # noqa: PLW0108 - bound later
    )
    executor = Executor(
        engine, writer, registry, monitor, owner=owner, lease_s=30, prices=prices or Prices({})
    )
    holder.append(executor)
    try:
        yield Harness(engine, registry, executor, writer)
    finally:
        monitor.close()
        executor.close()
        writer.close()


@pytest.fixture
def h(engine: Engine, request: pytest.FixtureRequest) -> Iterator[Harness]:
    with harness(engine, prices=getattr(request, "param", None)) as made:
        yield made


# The contract suites (test_run_store_contract.py, test_run_reads_contract.py): each storage
# seam's implementations, on each database they run on. `kind` is "<implementation>-<db>".
IMPLEMENTATIONS = [
    "sql-sqlite",
    pytest.param("sql-postgres", marks=pytest.mark.postgres),
    pytest.param("pg-postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(kind: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An engine on the emptied database `kind` names."""
    url = request.getfixturevalue("sqlite_url" if kind.endswith("sqlite") else "pg_url")
    engine = create_db_engine(url, pool_size=2, pre_ping=False)
    yield engine
    engine.dispose()
