"""copy_rows on PostgreSQL: work handed to `meanwhile` runs while the server ends the COPY,
and a row the server refuses at that end still fails the whole batch, after `meanwhile`."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError

from domain.clock import utc_now, uuid7_many
from domain.db.copy import copy_rows
from domain.db.models import runs
from domain.ports import OpenCatalog
from domain.runs import rows
from domain.runs.requests import build_requests

pytestmark = pytest.mark.postgres


def _rows(n: int, project: str = "default") -> list[dict[str, object]]:
    now = utc_now()
    requests = build_requests(
        [{"name": "t", "project": project, "params": {"i": i}} for i in range(n)]
    )
    return [
        rows.run_row(req, OpenCatalog(), now, True, run_id)
        for req, run_id in zip(requests, uuid7_many(n), strict=True)
    ]


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(runs)).scalar_one())


def test_meanwhile_runs_in_the_callers_thread_and_its_result_is_returned(pg_engine: Engine) -> None:
    rows = _rows(300)
    threads: list[str] = []

    def meanwhile() -> int:
        threads.append(threading.current_thread().name)
        return len(rows)

    with pg_engine.begin() as conn:
        assert copy_rows(conn, runs, rows, meanwhile=meanwhile) == 300
    assert threads == [threading.current_thread().name]
    assert _count(pg_engine) == 300


def test_a_row_refused_at_the_end_fails_the_batch_after_meanwhile(pg_engine: Engine) -> None:
    # The project foreign key is checked when the COPY ends, while `meanwhile` runs.
    rows = _rows(200) + _rows(1, project="ghost")
    ran: list[bool] = []
    with pytest.raises(IntegrityError, match="ghost"), pg_engine.begin() as conn:
        copy_rows(conn, runs, rows, meanwhile=lambda: ran.append(True))
    assert ran == [True]
    assert _count(pg_engine) == 0
    with pg_engine.begin() as conn:  # the connection went back to the pool in a usable state
        copy_rows(conn, runs, _rows(2))
    assert _count(pg_engine) == 2


def test_an_error_in_meanwhile_leaves_nothing_written(pg_engine: Engine) -> None:
    def meanwhile() -> None:
        raise RuntimeError("building the views failed")

    with pytest.raises(RuntimeError, match="views"), pg_engine.begin() as conn:
        copy_rows(conn, runs, _rows(50), meanwhile=meanwhile)
    assert _count(pg_engine) == 0
