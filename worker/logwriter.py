"""Buffered, batched writes of run log lines, metrics and cost entries (DESIGN guarantee 6).

Cost entries come here only for runs with nothing to enforce per call (no run budget, no
project limit, no open reservation; `TaskContext.cost` decides). Each batch adds a run's
entries and the sums of them to its totals in one transaction, fenced by `attempt`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc

from domain.clock import utc_now
from domain.db.engine import describe_db_error
from domain.errors import DatabaseUnavailable
from worker.batches import (
    LOG_COLUMNS,
    METRIC_COLUMNS,
    Batch,
    Row,
    Written,
    is_row_fault,
    reason,
    report_dropped,
    write,
    write_bisecting,
)

__all__ = ["LOG_COLUMNS", "MAX_MESSAGE_BYTES", "METRIC_COLUMNS", "LogWriter", "clean_message"]

#: One runaway line (a dumped blob, a progress bar with no newline) must not turn a COPY batch
#: into many megabytes, nor become a row the API and `conveyor logs` choke on.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_BACKOFF_S = 2.0
FIRST_BACKOFF_S = 0.1

Buffer = dict[UUID, list[Row]]


def clean_message(message: str) -> str:
    """`message` as it will be stored: NUL escaped (PostgreSQL text refuses it), cut at 64 KiB."""
    if type(message) is not str:
        message = str(message)
    if "\x00" in message:
        message = message.replace("\x00", "\\x00")
    # At most 4 bytes per character: a short string cannot be over the limit, so skip encoding.
    if len(message) <= MAX_MESSAGE_BYTES // 4:
        return message
    data = message.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    kept = data[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore")  # never split a character
    dropped = len(data) - len(kept.encode("utf-8", "surrogatepass"))
    return f"{kept} …[truncated {dropped} bytes]"


class LogWriter:
    """One per worker process: `log()`/`metric()`/`cost()` only append to memory; a daemon
    thread writes.

    Rows are kept until a write commits: a database outage is retried with backoff, and a full
    buffer makes callers wait rather than drop lines. A row the database can never accept (its
    run was deleted, an unencodable character) is bisected out of its batch and logged.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        flush_interval_s: float = 0.2,
        # 20k, not more: one flush writes the whole buffer, so a big buffer makes lines appear
        # in large late batches at the same lines/s (bench/logs.py measures the visibility).
        max_buffered: int = 20_000,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._engine = engine
        self._interval = flush_interval_s
        self._max = max_buffered
        self._clock = clock
        self._lock = threading.Lock()
        # Signalled when rows leave the buffer or an in-flight batch settles.
        self._changed = threading.Condition(self._lock)
        self._write_lock = threading.Lock()  # one batch in flight at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seqs: dict[UUID, int] = {}
        self._logs: Buffer = {}
        self._metrics: Buffer = {}
        self._costs: Buffer = {}
        self._pending = 0  # buffered + in flight: what max_buffered bounds
        self._inflight: frozenset[UUID] = frozenset()
        self._counts = dict.fromkeys(
            (
                "lines_written",
                "metrics_written",
                "costs_written",
                "costs_dropped",
                "flushes",
                "write_errors",
                "rows_rejected",
            ),
            0,
        )

    def start(self) -> None:
        """Start the flusher thread; a no-op when it is already running."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="conveyor-logwriter", daemon=True)
        self._thread.start()

    def begin_run(self, run_id: UUID, attempt: int, next_seq: int = 1) -> None:
        """Number the run's next lines from `next_seq` (attempts after the first continue on)."""
        with self._lock:
            self._seqs[run_id] = next_seq

    def end_run(self, run_id: UUID) -> None:
        """Forget the run's seq counter (its buffered rows are still written)."""
        with self._lock:
            self._seqs.pop(run_id, None)

    def log(
        self,
        run_id: UUID,
        attempt: int,
        message: str,
        *,
        stream: str = "log",
        level: str = "info",
        fields: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> int:
        """Buffer one line and return its seq. Blocks only while the buffer is full."""
        message = clean_message(message)
        ts = ts or self._clock()
        with self._lock:
            if self._pending >= self._max:
                self._wait_for_space()
            # seq is taken under the same lock as the append, so a run's rows stay in seq order.
            seq = self._seqs.get(run_id, 1)
            self._seqs[run_id] = seq + 1
            row = (run_id, seq, attempt, ts, stream, level, message, fields)
            self._append(self._logs, run_id, row)
        return seq

    def metric(
        self,
        run_id: UUID,
        name: str,
        value: float,
        labels: dict[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> None:
        """Buffer one metric sample. Blocks only while the buffer is full."""
        row = (run_id, ts or self._clock(), name, float(value), labels)
        with self._lock:
            if self._pending >= self._max:
                self._wait_for_space()
            self._append(self._metrics, run_id, row)

    def cost(
        self,
        run_id: UUID,
        attempt: int,
        step_seq: int | None,
        project: str,
        ts: datetime,
        provider: str,
        model: str,
        tokens_in: int,
        tokens_out: int,
        requests: int,
        cost_usd: Decimal,
        /,
    ) -> None:
        """Buffer one cost entry (already validated and priced, `cost_usd` exact to the column's
        scale). Positional only: it is called once per entry, in the task's loop. Blocks only
        while the buffer is full."""
        row = (
            run_id, step_seq, project, ts, provider, model,
            tokens_in, tokens_out, requests, cost_usd, attempt,
        )  # fmt: skip
        with self._lock:
            if self._pending >= self._max:
                self._wait_for_space()
            self._append(self._costs, run_id, row)

    def take_run(self, run_id: UUID) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Remove and return the run's unwritten (log rows, metric rows) for the caller to write.

        A batch of this run being written right now is waited for first, so every row is either
        written by the flusher or returned here, exactly once. The run's buffered cost entries
        are written (with its totals) before this returns, so the caller's final state is
        written after them; if the database refuses that now, they stay buffered for the
        flusher (fenced by attempt only, so they still land after the final state).
        """
        with self._lock:
            while run_id in self._inflight:
                self._changed.wait()
            logs = self._logs.pop(run_id, [])
            metrics = self._metrics.pop(run_id, [])
            costs = self._costs.pop(run_id, [])  # still counted in _pending until written
            if logs or metrics:
                self._pending -= len(logs) + len(metrics)
                self._changed.notify_all()
        if costs:
            self._write_costs_before_final(run_id, costs)
        return (
            [dict(zip(LOG_COLUMNS, row, strict=True)) for row in logs],
            [dict(zip(METRIC_COLUMNS, row, strict=True)) for row in metrics],
        )

    @staticmethod
    def write_rows(
        conn: Connection, logs: list[dict[str, Any]], metrics: list[dict[str, Any]]
    ) -> None:
        """Write row dicts (as `take_run` returns them) inside the caller's transaction."""
        batch = Batch(
            [tuple(row.get(c) for c in LOG_COLUMNS) for row in logs],
            [tuple(row.get(c) for c in METRIC_COLUMNS) for row in metrics],
            [],
        )
        written = write(conn, batch)
        if written.orphans:
            _report_rejected(written.orphans, "the run no longer exists")

    def flush(self) -> None:
        """Write everything buffered now; DatabaseUnavailable (rows kept) when that fails."""
        try:
            self._flush_once()
        except (sa_exc.DBAPIError, psycopg.Error) as exc:
            url = self._engine.url.render_as_string(hide_password=False)
            raise DatabaseUnavailable(describe_db_error(url, exc)) from exc

    def close(self) -> None:
        """Stop the flusher thread, then flush what is left (raising if that cannot be done)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()

    @property
    def stats(self) -> dict[str, int]:
        """lines_written, metrics_written, costs_written, costs_dropped (stale attempt), flushes,
        write_errors, rows_rejected, buffered."""
        with self._lock:
            return {**self._counts, "buffered": self._pending}

    # -- internals -------------------------------------------------------------------------

    def _append(self, buffer: Buffer, run_id: UUID, row: Row) -> None:
        rows = buffer.get(run_id)
        if rows is None:
            buffer[run_id] = rows = []
        rows.append(row)
        self._pending += 1

    def _wait_for_space(self) -> None:
        while self._pending >= self._max:
            # Re-arm the wake-up each round: the flusher may have consumed the previous one.
            self._wake.set()
            self._changed.wait(timeout=1.0)

    def _run(self) -> None:
        delay = 0.0
        failures = 0
        while True:
            if delay:
                self._stop.wait(delay)  # a full buffer must not shorten the backoff
            else:
                self._wake.wait(self._interval)
                self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._flush_once()
            except Exception as exc:
                failures += 1
                if failures == 1:  # once per outage, not once per retry
                    structlog.get_logger("conveyor.logwriter").warning(
                        "logwriter.write_failed",
                        error=reason(exc),
                        buffered=self.stats["buffered"],
                    )
                delay = min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, delay * 2))
            else:
                if failures:
                    structlog.get_logger("conveyor.logwriter").info(
                        "logwriter.write_recovered", failed_attempts=failures
                    )
                failures = 0
                delay = 0.0

    def _flush_once(self) -> None:
        with self._write_lock:
            with self._lock:
                logs, metrics, costs = self._logs, self._metrics, self._costs
                if not logs and not metrics and not costs:
                    return
                self._logs, self._metrics, self._costs = {}, {}, {}
                self._inflight = frozenset(logs.keys() | metrics.keys() | costs.keys())
            batch = Batch(
                [row for rows in logs.values() for row in rows],
                [row for rows in metrics.values() for row in rows],
                [row for rows in costs.values() for row in rows],
            )
            try:
                written = self._write_batch(batch)
            except BaseException:
                with self._lock:
                    _put_back(self._logs, logs)
                    _put_back(self._metrics, metrics)
                    _put_back(self._costs, costs)
                    self._counts["write_errors"] += 1
                    self._settle()
                raise
            with self._lock:
                self._account(batch, written)
                self._counts["flushes"] += 1
                self._settle()
        report_dropped(written.stale)

    def _write_costs_before_final(self, run_id: UUID, costs: list[Row]) -> None:
        batch = Batch([], [], costs)
        try:
            written = self._write_batch(batch)
        except Exception as exc:
            with self._lock:  # still counted in _pending: nothing else to undo
                _put_back(self._costs, {run_id: costs})
                self._counts["write_errors"] += 1
            self._wake.set()
            structlog.get_logger("conveyor.logwriter").warning(
                "logwriter.costs_deferred",
                run_id=str(run_id),
                entries=len(costs),
                error=reason(exc),
                next="the flusher writes them when the database answers",
            )
            return
        with self._lock:
            self._account(batch, written)
            self._changed.notify_all()
        report_dropped(written.stale)

    def _account(self, batch: Batch, written: Written) -> None:
        """Count a settled batch (under the lock): it leaves the buffer."""
        self._pending -= len(batch)
        self._counts["lines_written"] += written.lines
        self._counts["metrics_written"] += written.points
        self._counts["costs_written"] += written.costs
        self._counts["costs_dropped"] += len(written.stale)
        self._counts["rows_rejected"] += len(batch) - written.settled

    def _settle(self) -> None:
        self._inflight = frozenset()
        self._changed.notify_all()

    def _write_batch(self, batch: Batch) -> Written:
        rejected: list[tuple[Row, BaseException]] = []
        try:
            with self._engine.begin() as conn:
                written = write(conn, batch)
        except Exception as exc:
            if not is_row_fault(exc):
                raise
            with self._engine.begin() as conn:
                written = write_bisecting(conn, batch, rejected)
        if rejected:
            _report_rejected([row for row, _ in rejected], reason(rejected[0][1]))
        if written.orphans:
            _report_rejected(written.orphans, "the run no longer exists")
        return written


def _report_rejected(rows: list[Row], why: str) -> None:
    structlog.get_logger("conveyor.logwriter").error(
        "logwriter.rows_rejected",
        rows=len(rows),
        run_ids=sorted({str(row[0]) for row in rows})[:10],
        error=why,
    )


def _put_back(buffer: Buffer, taken: Buffer) -> None:
    """Return a failed batch to the buffer, ahead of the rows logged while it was in flight."""
    for run_id, rows in taken.items():
        newer = buffer.get(run_id)
        buffer[run_id] = rows + newer if newer else rows
