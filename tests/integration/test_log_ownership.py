"""run_logs has no foreign key (migration 0009): a line still never outlives its run.

Writers lock the runs of a batch `FOR KEY SHARE`; `lines.delete_runs` deletes the runs, then
their lines. Each test holds one side's transaction open and lets the other run into it, in
both orders, then checks that no line of the deleted run is left.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select

from domain.clock import utc_now
from domain.db.engine import create_db_engine
from domain.db.models import run_logs, runs
from domain.db.unit_of_work import UnitOfWork
from domain.housekeeping.retention import apply_retention
from domain.runs import enqueue, lines
from domain.runs.requests import build_request
from tests.concurrent import in_thread, waits_on_a_lock
from tests.polling import eventually
from worker.batches import Batch, Written, write

pytestmark = pytest.mark.postgres


def _run(engine: Engine) -> uuid.UUID:
    return enqueue.enqueue(UnitOfWork(engine), build_request(name="t")).run.id


def _lines(run_id: uuid.UUID, n: int) -> Batch:
    now = utc_now()
    return Batch(
        [(run_id, seq, 1, now, "log", "info", f"line {seq}", None) for seq in range(1, n + 1)],
        [],
        [],
    )


def _left(engine: Engine, run_id: uuid.UUID) -> tuple[int, int]:
    """(runs, lines) left with this id."""
    with engine.connect() as conn:
        found = conn.execute(select(func.count()).where(runs.c.id == run_id)).scalar_one()
        lines = conn.execute(select(func.count()).where(run_logs.c.run_id == run_id)).scalar_one()
    return found, lines


def test_a_run_deleted_while_its_lines_are_written_takes_them_along(pg_engine: Engine) -> None:
    run_id, other = _run(pg_engine), _run(pg_engine)
    with pg_engine.connect() as writer:
        writer.begin()
        written = write(writer, _lines(run_id, 500))
        assert written.lines == 500 and not written.orphans

        def delete() -> int:
            with pg_engine.begin() as conn:
                return lines.delete_runs(conn, [run_id])

        deleter, out = in_thread(delete)
        eventually(waits_on_a_lock(pg_engine), timeout=10, every=0.02)  # the writer's lock
        writer.commit()
    deleter.join(timeout=10)
    assert out == {"value": 1}
    assert _left(pg_engine, run_id) == (0, 0)
    assert _left(pg_engine, other) == (1, 0)


def test_lines_of_a_run_being_deleted_wait_then_are_dropped(pg_engine: Engine) -> None:
    run_id, other = _run(pg_engine), _run(pg_engine)
    with pg_engine.connect() as deleter:
        deleter.begin()
        assert lines.delete_runs(deleter, [run_id]) == 1

        def write_lines() -> Written:
            batch = _lines(run_id, 3)
            batch.logs.append((other, 1, 1, utc_now(), "log", "info", "kept", None))
            with pg_engine.begin() as conn:
                return write(conn, batch)

        writer, out = in_thread(write_lines)
        eventually(waits_on_a_lock(pg_engine), timeout=10, every=0.02)  # the delete's lock
        deleter.commit()
    writer.join(timeout=10)
    written = out["value"]
    assert written.lines == 1
    assert [row[6] for row in written.orphans] == ["line 1", "line 2", "line 3"]
    assert _left(pg_engine, run_id) == (0, 0)
    assert _left(pg_engine, other) == (1, 1)


@pytest.fixture
def strict_engine(pg_url: str) -> Iterator[Engine]:
    """Every transaction REPEATABLE READ, as a server default of it would make them."""
    engine = create_db_engine(pg_url)
    yield engine.execution_options(isolation_level="REPEATABLE READ")
    engine.dispose()


def test_retention_under_a_repeatable_read_default_leaves_no_line_behind(
    pg_engine: Engine, strict_engine: Engine
) -> None:
    """A writer commits lines after retention's transaction has read which runs to delete;
    with one snapshot for the whole transaction the lines delete would not see them."""
    now = utc_now()
    run_id = _run(pg_engine)
    with pg_engine.begin() as conn:
        conn.execute(
            runs.update()
            .where(runs.c.id == run_id)
            # Made and finished 40 days ago (a run made today would wait for its day's
            # partitions to go whole, retention's rule on PostgreSQL).
            .values(
                status="succeeded",
                created_at=now - timedelta(days=41),
                finished_at=now - timedelta(days=40),
            )
        )
    late: list[Written] = []

    @event.listens_for(strict_engine, "before_cursor_execute")
    def write_late(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM RUNS") and not late:
            with pg_engine.begin() as other:  # a writer that held the run while it wrote
                late.append(write(other, _lines(run_id, 3)))

    assert apply_retention(strict_engine, now=now, default_days=30) == 1
    assert [w.lines for w in late] == [3]
    assert _left(pg_engine, run_id) == (0, 0)
