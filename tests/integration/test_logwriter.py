"""The log writer (guarantee 6): lines land in order, in batches, none lost or doubled."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from structlog.testing import capture_logs

from domain.db.engine import create_db_engine
from domain.db.models import RunLog, RunMetric
from domain.db.unit_of_work import UnitOfWork
from domain.errors import DatabaseUnavailable
from domain.runs import enqueue
from domain.runs.requests import build_request
from tests.fakes import FakeClock
from tests.polling import eventually
from worker.logwriter import MAX_MESSAGE_BYTES, LogWriter

DOWN_URL = "postgresql+psycopg://u@127.0.0.1:1/x"


@pytest.fixture
def run_id(engine: Engine, clock: FakeClock) -> uuid.UUID:
    return enqueue.enqueue(UnitOfWork(engine, clock=clock), build_request(name="t")).run.id


@pytest.fixture
def writer(engine: Engine, clock: FakeClock) -> Iterator[LogWriter]:
    lw = LogWriter(engine, clock=clock)
    yield lw
    lw.close()


@pytest.fixture
def down_engine() -> Iterator[Engine]:
    eng = create_db_engine(DOWN_URL)
    yield eng
    eng.dispose()


def stored_lines(engine: Engine, run_id: uuid.UUID) -> list[Any]:
    query = select(RunLog).where(RunLog.run_id == run_id).order_by(RunLog.seq)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def count_lines(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(RunLog)).scalar_one())


def test_lines_are_written_in_order_with_their_seq(
    writer: LogWriter, engine: Engine, run_id: uuid.UUID, clock: FakeClock
) -> None:
    assert writer.log(run_id, 1, "first") == 1  # never begun: starts at 1
    writer.log(run_id, 1, "second", stream="stdout", level="warning", fields={"k": [1, 2]})
    writer.begin_run(run_id, 2, next_seq=10)
    assert writer.log(run_id, 2, "retried") == 10
    writer.flush()

    rows = stored_lines(engine, run_id)
    assert [(r.seq, r.attempt, r.message) for r in rows] == [
        (1, 1, "first"),
        (2, 1, "second"),
        (10, 2, "retried"),
    ]
    assert (rows[1].stream, rows[1].level, rows[1].fields) == ("stdout", "warning", {"k": [1, 2]})
    assert (rows[0].stream, rows[0].level, rows[0].fields) == ("log", "info", None)
    assert all(r.ts == clock.now for r in rows)
    assert writer.stats == {
        "lines_written": 3,
        "metrics_written": 0,
        "costs_written": 0,
        "costs_dropped": 0,
        "flushes": 1,
        "write_errors": 0,
        "rows_rejected": 0,
        "buffered": 0,
    }


def test_the_flusher_writes_without_being_asked(
    writer: LogWriter, engine: Engine, run_id: uuid.UUID
) -> None:
    writer.start()
    writer.start()  # idempotent
    for i in range(5):
        writer.log(run_id, 1, f"line {i}")
    eventually(lambda: len(stored_lines(engine, run_id)) == 5, timeout=5.0, every=0.02)
    assert writer.stats["buffered"] == 0


def test_metrics_land_with_their_labels(
    writer: LogWriter, engine: Engine, run_id: uuid.UUID, clock: FakeClock
) -> None:
    writer.metric(run_id, "rows", 120, {"table": "orders"})
    writer.metric(run_id, "cpu_percent", 12.5)
    writer.flush()
    query = select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.id)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    assert [(r.name, r.value, r.labels, r.ts) for r in rows] == [
        ("rows", 120.0, {"table": "orders"}, clock.now),
        ("cpu_percent", 12.5, None, clock.now),
    ]
    assert writer.stats["metrics_written"] == 2


def test_take_run_returns_the_unwritten_rows_and_the_flusher_never_writes_them(
    writer: LogWriter, engine: Engine, run_id: uuid.UUID
) -> None:
    writer.log(run_id, 1, "written by the flusher")
    writer.flush()
    writer.log(run_id, 1, "last words", fields={"x": 1})
    writer.metric(run_id, "rows", 3, {"t": "a"})

    logs, metrics = writer.take_run(run_id)
    assert [(r["seq"], r["message"], r["fields"]) for r in logs] == [(2, "last words", {"x": 1})]
    assert list(logs[0]) == [
        "run_id",
        "seq",
        "attempt",
        "ts",
        "stream",
        "level",
        "message",
        "fields",
    ]
    assert [(m["name"], m["value"], m["labels"]) for m in metrics] == [("rows", 3.0, {"t": "a"})]
    assert list(metrics[0]) == ["run_id", "ts", "name", "value", "labels"]
    assert writer.stats["buffered"] == 0
    assert writer.take_run(run_id) == ([], [])

    writer.flush()
    assert [r.message for r in stored_lines(engine, run_id)] == ["written by the flusher"]
    # The executor writes them with the run's final state, in one transaction.
    with engine.begin() as conn:
        LogWriter.write_rows(conn, logs, metrics)
    assert [r.message for r in stored_lines(engine, run_id)] == [
        "written by the flusher",
        "last words",
    ]


def test_take_run_racing_the_flusher_neither_loses_nor_doubles_a_row(
    engine: Engine, run_id: uuid.UUID
) -> None:
    writer = LogWriter(engine, flush_interval_s=0.001)
    writer.start()
    threads_n, per_thread = 6, 400
    taken: list[dict[str, Any]] = []
    done = threading.Event()

    def produce() -> None:
        for i in range(per_thread):
            writer.log(run_id, 1, f"{threading.get_ident()} {i}")
            if i % 50 == 0:
                time.sleep(0.002)  # let flushes and takes interleave with the logging

    def take() -> None:
        while not done.is_set():
            taken.extend(writer.take_run(run_id)[0])
            time.sleep(0.001)

    taker = threading.Thread(target=take)
    taker.start()
    producers = [threading.Thread(target=produce) for _ in range(threads_n)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    done.set()
    taker.join()
    writer.close()

    written = [r.seq for r in stored_lines(engine, run_id)]
    taken_seqs = [r["seq"] for r in taken]
    total = threads_n * per_thread
    assert len(written) + len(taken_seqs) == total
    assert sorted(written + taken_seqs) == list(range(1, total + 1))
    assert writer.stats["lines_written"] == len(written)


def test_write_rows_belongs_to_the_callers_transaction(
    writer: LogWriter, engine: Engine, run_id: uuid.UUID
) -> None:
    writer.log(run_id, 1, "a")
    writer.metric(run_id, "m", 1.0, {"k": "v"})
    logs, metrics = writer.take_run(run_id)
    with engine.connect() as conn:
        tx = conn.begin()
        LogWriter.write_rows(conn, logs, metrics)
        assert conn.execute(select(func.count()).select_from(RunLog)).scalar_one() == 1
        tx.rollback()
    assert count_lines(engine) == 0
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(RunMetric)).scalar_one() == 0


def test_a_full_buffer_makes_callers_wait_instead_of_dropping(
    engine: Engine, run_id: uuid.UUID
) -> None:
    # A long interval: only back-pressure can wake the flusher in time.
    writer = LogWriter(engine, flush_interval_s=60, max_buffered=10)
    writer.start()
    peak = 0
    for i in range(200):
        writer.log(run_id, 1, f"line {i}")
        peak = max(peak, writer.stats["buffered"])
    writer.close()
    assert peak <= 10
    assert [r.seq for r in stored_lines(engine, run_id)] == list(range(1, 201))
    assert writer.stats["flushes"] >= 200 // 10


def test_back_pressure_blocks_until_rows_are_drained(down_engine: Engine) -> None:
    run_id = uuid.uuid4()
    writer = LogWriter(down_engine, flush_interval_s=0.01, max_buffered=3)
    writer.start()
    for i in range(3):
        writer.log(run_id, 1, f"line {i}")
    blocked = threading.Thread(target=writer.log, args=(run_id, 1, "waits for room"))
    blocked.start()
    blocked.join(timeout=0.3)
    assert blocked.is_alive(), "log() should wait while the buffer is full"

    logs, _ = writer.take_run(run_id)  # draining makes room
    blocked.join(timeout=5)
    assert not blocked.is_alive()
    assert [r["seq"] for r in logs] == [1, 2, 3]
    assert [r["message"] for r in writer.take_run(run_id)[0]] == ["waits for room"]
    writer.close()


def test_a_database_outage_keeps_every_row_and_is_logged_once(down_engine: Engine) -> None:
    run_id = uuid.uuid4()
    writer = LogWriter(down_engine, flush_interval_s=0.01)
    for i in range(5):
        writer.log(run_id, 1, f"line {i}")
    writer.metric(run_id, "rows", 1, {"k": "v"})
    with capture_logs() as events:
        writer.start()
        eventually(lambda: writer.stats["write_errors"] >= 3, timeout=5.0, every=0.02)
        logs, metrics = writer.take_run(run_id)
    failures = [e for e in events if e["event"] == "logwriter.write_failed"]
    assert len(failures) == 1
    assert failures[0]["log_level"] == "warning"
    assert [r["seq"] for r in logs] == [1, 2, 3, 4, 5]
    assert [m["labels"] for m in metrics] == [{"k": "v"}]
    assert writer.stats["lines_written"] == 0
    writer.close()  # nothing left to write, so nothing to fail


def test_flush_on_a_down_database_is_a_clear_error_and_keeps_the_rows(
    down_engine: Engine,
) -> None:
    run_id = uuid.uuid4()
    writer = LogWriter(down_engine)
    writer.log(run_id, 1, "kept")
    with pytest.raises(DatabaseUnavailable, match="cannot reach the database"):
        writer.flush()
    assert writer.stats["buffered"] == 1
    assert [r["message"] for r in writer.take_run(run_id)[0]] == ["kept"]


def test_a_row_the_database_refuses_costs_only_itself(
    writer: LogWriter, engine: Engine, run_id: uuid.UUID
) -> None:
    orphan = uuid.uuid4()  # no such run: its lines are dropped
    writer.log(run_id, 1, "before")
    writer.log(orphan, 1, "lost run")
    writer.log(run_id, 1, "unserialisable", fields={"x": object()})
    writer.log(run_id, 1, "after")
    with capture_logs() as events:
        writer.flush()
    assert [r.message for r in stored_lines(engine, run_id)] == ["before", "after"]
    assert writer.stats["rows_rejected"] == 2
    assert writer.stats["buffered"] == 0
    refused, orphaned = (e for e in events if e["event"] == "logwriter.rows_rejected")
    assert refused["rows"] == 1 and refused["run_ids"] == [str(run_id)]
    assert orphaned == {
        "event": "logwriter.rows_rejected",
        "log_level": "error",
        "rows": 1,
        "run_ids": [str(orphan)],
        "error": "the run no longer exists",
    }


def test_a_runaway_line_is_truncated_with_a_marker(
    writer: LogWriter, engine: Engine, run_id: uuid.UUID
) -> None:
    writer.log(run_id, 1, "x" * 100_000)
    writer.log(run_id, 1, "é" * 40_000)  # two bytes each: the cut never splits a character
    writer.log(run_id, 1, "nul\x00byte")
    writer.flush()
    first, second, third = (r.message for r in stored_lines(engine, run_id))
    assert first == "x" * MAX_MESSAGE_BYTES + f" …[truncated {100_000 - MAX_MESSAGE_BYTES} bytes]"
    assert second == "é" * (MAX_MESSAGE_BYTES // 2) + " …[truncated 14464 bytes]"
    assert third == "nul\\x00byte"
