"""Buffered, batched writes of run log lines and metrics (DESIGN guarantee 6)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import psycopg
import structlog
from sqlalchemy import Connection, Engine, Table
from sqlalchemy import exc as sa_exc

from domain.clock import utc_now
from domain.db import describe_db_error
from domain.errors import DatabaseUnavailable
from domain.models import RunMetric, run_logs

run_metrics = cast(Table, RunMetric.__table__)

LOG_COLUMNS = ("run_id", "seq", "attempt", "ts", "stream", "level", "message", "fields")
METRIC_COLUMNS = ("run_id", "ts", "name", "value", "labels")
_COPY_LOGS = f"COPY run_logs ({', '.join(LOG_COLUMNS)}) FROM STDIN"
_COPY_METRICS = f"COPY run_metrics ({', '.join(METRIC_COLUMNS)}) FROM STDIN"
# Declared column types let psycopg pick each dumper once per COPY, not once per value (and
# dump dicts as jsonb without a wrapper per row).
_LOG_TYPES = ["uuid", "int8", "int4", "timestamptz", "text", "text", "text", "jsonb"]
_METRIC_TYPES = ["uuid", "timestamptz", "text", "float8", "jsonb"]

#: One runaway line (a dumped blob, a progress bar with no newline) must not turn a COPY batch
#: into many megabytes, nor become a row the API and `conveyor logs` choke on.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_BACKOFF_S = 2.0
FIRST_BACKOFF_S = 0.1

Row = tuple[Any, ...]
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
    """One per worker process: `log()`/`metric()` only append to memory; a daemon thread writes.

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
        # in large late batches (bench/logs.py: p99 visibility 771 ms at 100k, 300 ms at 20k,
        # the same lines/s).
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
        self._pending = 0  # buffered + in flight: what max_buffered bounds
        self._inflight: frozenset[UUID] = frozenset()
        self._counts = dict.fromkeys(
            ("lines_written", "metrics_written", "flushes", "write_errors", "rows_rejected"), 0
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

    def take_run(self, run_id: UUID) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Remove and return the run's unwritten (log rows, metric rows) for the caller to write.

        A batch of this run being written right now is waited for first, so every row is either
        written by the flusher or returned here, exactly once.
        """
        with self._lock:
            while run_id in self._inflight:
                self._changed.wait()
            logs = self._logs.pop(run_id, [])
            metrics = self._metrics.pop(run_id, [])
            if logs or metrics:
                self._pending -= len(logs) + len(metrics)
                self._changed.notify_all()
        return (
            [dict(zip(LOG_COLUMNS, row, strict=True)) for row in logs],
            [dict(zip(METRIC_COLUMNS, row, strict=True)) for row in metrics],
        )

    @staticmethod
    def write_rows(
        conn: Connection, logs: list[dict[str, Any]], metrics: list[dict[str, Any]]
    ) -> None:
        """Write row dicts (as `take_run` returns them) inside the caller's transaction."""
        _write_tuples(
            conn,
            [tuple(row.get(c) for c in LOG_COLUMNS) for row in logs],
            [tuple(row.get(c) for c in METRIC_COLUMNS) for row in metrics],
        )

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
        """lines_written, metrics_written, flushes, write_errors, rows_rejected, buffered."""
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
                        error=_reason(exc),
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
                logs, metrics = self._logs, self._metrics
                if not logs and not metrics:
                    return
                self._logs, self._metrics = {}, {}
                self._inflight = frozenset(logs.keys() | metrics.keys())
            log_rows = [row for rows in logs.values() for row in rows]
            metric_rows = [row for rows in metrics.values() for row in rows]
            try:
                lines, points = self._write_batch(log_rows, metric_rows)
            except BaseException:
                with self._lock:
                    _put_back(self._logs, logs)
                    _put_back(self._metrics, metrics)
                    self._counts["write_errors"] += 1
                    self._settle()
                raise
            with self._lock:
                self._pending -= len(log_rows) + len(metric_rows)
                self._counts["lines_written"] += lines
                self._counts["metrics_written"] += points
                self._counts["rows_rejected"] += len(log_rows) + len(metric_rows) - lines - points
                self._counts["flushes"] += 1
                self._settle()

    def _settle(self) -> None:
        self._inflight = frozenset()
        self._changed.notify_all()

    def _write_batch(self, logs: list[Row], metrics: list[Row]) -> tuple[int, int]:
        try:
            with self._engine.begin() as conn:
                _write_tuples(conn, logs, metrics)
            return len(logs), len(metrics)
        except Exception as exc:
            if not _row_fault(exc):
                raise
        rejected: list[tuple[Row, BaseException]] = []
        with self._engine.begin() as conn:
            written = _bisect(conn, logs, metrics, rejected)
        if rejected:
            structlog.get_logger("conveyor.logwriter").error(
                "logwriter.rows_rejected",
                rows=len(rejected),
                run_ids=sorted({str(row[0]) for row, _ in rejected})[:10],
                error=_reason(rejected[0][1]),
            )
        return written


def _put_back(buffer: Buffer, taken: Buffer) -> None:
    """Return a failed batch to the buffer, ahead of the rows logged while it was in flight."""
    for run_id, rows in taken.items():
        newer = buffer.get(run_id)
        buffer[run_id] = rows + newer if newer else rows


def _bisect(
    conn: Connection, logs: list[Row], metrics: list[Row], rejected: list[tuple[Row, BaseException]]
) -> tuple[int, int]:
    """Write what can be written, halving on row errors so k bad rows cost O(k log n) tries."""
    if not logs and not metrics:
        return 0, 0
    try:
        with conn.begin_nested():
            _write_tuples(conn, logs, metrics)
        return len(logs), len(metrics)
    except Exception as exc:
        if not _row_fault(exc):
            raise
        if len(logs) + len(metrics) == 1:
            rejected.append(((logs or metrics)[0], exc))
            return 0, 0
    if logs and metrics:
        parts = [(logs, []), ([], metrics)]
    elif logs:
        parts = [(logs[: len(logs) // 2], []), (logs[len(logs) // 2 :], [])]
    else:
        parts = [([], metrics[: len(metrics) // 2]), ([], metrics[len(metrics) // 2 :])]
    lines = points = 0
    for part_logs, part_metrics in parts:
        written = _bisect(conn, part_logs, part_metrics, rejected)
        lines, points = lines + written[0], points + written[1]
    return lines, points


def _write_tuples(conn: Connection, logs: list[Row], metrics: list[Row]) -> None:
    if not conn.in_transaction():
        conn.begin()  # what autobegin would do; the raw COPY below bypasses it
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        raw = cast("psycopg.Connection[Any]", conn.connection.driver_connection)
        with raw.cursor() as cur:
            if logs:
                with cur.copy(_COPY_LOGS) as copy:
                    copy.set_types(_LOG_TYPES)
                    for row in logs:
                        copy.write_row(row)
            if metrics:
                with cur.copy(_COPY_METRICS) as copy:
                    copy.set_types(_METRIC_TYPES)
                    for row in metrics:
                        copy.write_row(row)
        return
    # SQLite (dev mode): Core executemany, so the column types store UUIDs and times as usual.
    if logs:
        conn.execute(run_logs.insert(), [dict(zip(LOG_COLUMNS, r, strict=True)) for r in logs])
    if metrics:
        conn.execute(
            run_metrics.insert(), [dict(zip(METRIC_COLUMNS, r, strict=True)) for r in metrics]
        )


def _row_fault(exc: BaseException) -> bool:
    """True when the rows themselves are refused, so retrying the same batch can never succeed.

    Anything else (database down, table missing, permissions) keeps the rows and is retried.
    """
    if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
        return True
    orig = getattr(exc, "orig", None) or exc  # StatementError wraps bind-time errors
    return isinstance(
        orig, psycopg.IntegrityError | psycopg.DataError | UnicodeError | TypeError | ValueError
    )


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
