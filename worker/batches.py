"""How one batch of buffered rows is written: COPY on PostgreSQL, executemany on SQLite.

Cost entries are written with their run's totals, fenced by attempt, and their projects'
monthly usage, in the same transaction; rows the database refuses are bisected out, each part
in its own savepoint with its own share of the totals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from operator import itemgetter
from typing import Any, cast
from uuid import UUID

import psycopg
import structlog
from sqlalchemy import Connection, Table
from sqlalchemy import exc as sa_exc

from domain.costs import ledger
from domain.db.capabilities import capabilities
from domain.db.copy import copy_tuples
from domain.db.models import RunMetric, cost_entries, run_logs
from domain.runs import lines as run_lines

run_metrics = cast(Table, RunMetric.__table__)

LOG_COLUMNS = ("run_id", "seq", "attempt", "ts", "stream", "level", "message", "fields")
METRIC_COLUMNS = ("run_id", "ts", "name", "value", "labels")
# A buffered cost row is (run_id, step_seq, project, ts, provider, model, tokens_in,
# tokens_out, requests, cost_usd, attempt): the attempt that recorded it last (the fence). It
# is written as these columns, with the seq its run's totals hand out (_add_to_totals).
COST_COLUMNS = (
    "run_id", "seq", "step_seq", "project", "ts", "provider", "model",
    "tokens_in", "tokens_out", "requests", "cost_usd",
)  # fmt: skip

ZERO = Decimal(0)
Row = tuple[Any, ...]


@dataclass
class Batch:
    """Rows written in one transaction: log lines, metric samples, cost entries."""

    logs: list[Row]
    metrics: list[Row]
    costs: list[Row]

    def __len__(self) -> int:
        return len(self.logs) + len(self.metrics) + len(self.costs)

    def only(self) -> Row:
        return (self.logs or self.metrics or self.costs)[0]

    def halves(self) -> list[Batch]:
        """Split to find refused rows: by kind first, then in half."""
        kinds = [
            Batch(self.logs, [], []), Batch([], self.metrics, []), Batch([], [], self.costs)
        ]  # fmt: skip
        kinds = [kind for kind in kinds if len(kind)]
        if len(kinds) > 1:
            return kinds
        h = len(self) // 2
        return [
            Batch(self.logs[:h], self.metrics[:h], self.costs[:h]),
            Batch(self.logs[h:], self.metrics[h:], self.costs[h:]),
        ]


@dataclass
class Written:
    """What a batch wrote: lines, metric points, cost entries, cost entries dropped because
    their attempt no longer owns the run (`stale`), and lines dropped because their run is gone
    (`orphans`, counted as rejected)."""

    lines: int = 0
    points: int = 0
    costs: int = 0
    stale: list[Row] = field(default_factory=list)
    orphans: list[Row] = field(default_factory=list)  # lines of runs that no longer exist

    @property
    def settled(self) -> int:
        """Rows done with: written, or dropped for a reason that is not a fault (stale)."""
        return self.lines + self.points + self.costs + len(self.stale)

    def add(self, other: Written) -> None:
        self.lines += other.lines
        self.points += other.points
        self.costs += other.costs
        self.stale += other.stale
        self.orphans += other.orphans


def write_bisecting(
    conn: Connection, batch: Batch, rejected: list[tuple[Row, BaseException]]
) -> Written:
    """Write what can be written, halving on row errors so k bad rows cost O(k log n) tries.

    Each part commits in its own savepoint with its own share of the run totals, so the totals
    always equal the sum of the cost entries that were written.
    """
    if not len(batch):
        return Written()
    try:
        with conn.begin_nested():
            return write(conn, batch)
    except Exception as exc:
        if not is_row_fault(exc):
            raise
        if len(batch) == 1:
            rejected.append((batch.only(), exc))
            return Written()
    written = Written()
    for part in batch.halves():
        written.add(write_bisecting(conn, part, rejected))
    return written


def write(conn: Connection, batch: Batch) -> Written:
    """Write the batch in the caller's transaction; what was written, and what was stale."""
    if not conn.in_transaction():
        conn.begin()  # what autobegin would do; the raw COPY below bypasses it
    # The fence first: entries of an attempt that no longer owns its run are not written.
    numbered, stale, months = _add_to_totals(conn, batch.costs) if batch.costs else ([], [], {})
    logs, orphans = _lines_of_live_runs(conn, batch.logs)
    metrics = batch.metrics
    if capabilities(conn).copy:
        if logs:
            copy_tuples(conn, run_logs, LOG_COLUMNS, logs)
        if metrics:
            copy_tuples(conn, run_metrics, METRIC_COLUMNS, metrics)
        if numbered:
            # Binary: a cost row is mostly numbers, a uuid and a time, which PostgreSQL then
            # need not parse from text.
            copy_tuples(conn, cost_entries, COST_COLUMNS, _numbered_rows(numbered), binary=True)
    else:
        # SQLite (dev mode): Core executemany, so the column types store UUIDs, times and
        # money (as exact text) as usual.
        if logs:
            conn.execute(run_logs.insert(), [dict(zip(LOG_COLUMNS, r, strict=True)) for r in logs])
        if metrics:
            conn.execute(
                run_metrics.insert(), [dict(zip(METRIC_COLUMNS, r, strict=True)) for r in metrics]
            )
        if numbered:
            conn.execute(
                cost_entries.insert(),
                [dict(zip(COST_COLUMNS, r, strict=True)) for r in _numbered_rows(numbered)],
            )
    if months:
        _add_to_months(conn, months)  # last: the project's row is the one other workers share
    return Written(len(logs), len(metrics), sum(len(rows) for rows, _ in numbered), stale, orphans)


def _lines_of_live_runs(conn: Connection, lines: list[Row]) -> tuple[list[Row], list[Row]]:
    """(lines to write, lines whose run no longer exists), the runs locked until commit."""
    if not lines:
        return lines, []
    run_ids: list[UUID] = []
    last = None
    for row in lines:  # a run's lines arrive together: mostly identity checks, no hashing
        if row[0] is not last:
            last = row[0]
            run_ids.append(last)
    wanted = set(run_ids)
    live = run_lines.lock_for_lines(conn, list(wanted))
    if len(live) == len(wanted):
        return lines, []
    return [r for r in lines if r[0] in live], [r for r in lines if r[0] not in live]


Numbered = list[tuple[list[Row], int]]  # buffered rows, and the seq the first of them takes


def _numbered_rows(numbered: Numbered) -> Iterator[Row]:
    """The rows as COST_COLUMNS, each made as it is written: holding a second copy of a whole
    batch would cost the garbage collector a pass per 700 rows."""
    for rows, first in numbered:
        for seq, row in enumerate(rows, first):
            yield (row[0], seq, *row[1:10])


Months = dict[tuple[str, date], list[Any]]  # (project, month) -> [usd, tokens]


def _add_to_totals(conn: Connection, rows: list[Row]) -> tuple[Numbered, list[Row], Months]:
    """Add each (run, attempt)'s sums to the run's totals, fenced by attempt.

    Returns the rows to write with the seq each group starts at, the buffered rows whose
    attempt no longer owns the run, and what the written rows add to each project's month. Runs are
    locked in one order (by id) in every writer, so two batches can never wait on each other
    in a cycle.
    """
    groups: dict[tuple[UUID, int], list[Row]] = {}
    key: tuple[UUID, int] | None = None
    group: list[Row] = []
    for row in rows:  # a run's rows arrive together: mostly identity checks, no hashing
        if key is None or row[0] is not key[0] or row[10] != key[1]:
            key = (row[0], row[10])
            group = groups.setdefault(key, [])
        group.append(row)
    kept: Numbered = []
    stale: list[Row] = []
    months: Months = {}
    for run_id, attempt in sorted(groups):
        group = groups[(run_id, attempt)]
        usd = sum(map(_USD, group), ZERO)
        tokens_in, tokens_out = sum(map(_TOKENS_IN, group)), sum(map(_TOKENS_OUT, group))
        numbered_to = ledger.add_to_run(
            conn,
            run_id,
            attempt,
            usd=usd,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            requests=sum(map(_REQUESTS, group)),
            entries=len(group),
        )
        if numbered_to is None:
            stale += group
            continue
        kept.append((group, numbered_to - len(group) + 1))
        first, last = _month(min(map(_TS, group))), _month(max(map(_TS, group)))
        if first == last:  # the usual case: one month, the sums above
            _add_month(months, (group[0][2], first), usd, tokens_in + tokens_out)
        else:
            for row in group:
                _add_month(months, (row[2], _month(row[3])), row[9], row[6] + row[7])
    return kept, stale, months


_TS, _TOKENS_IN, _TOKENS_OUT, _REQUESTS, _USD = (itemgetter(i) for i in (3, 6, 7, 8, 9))


def _month(ts: datetime) -> date:
    return date(ts.year, ts.month, 1) if ts.tzinfo is UTC else ledger.month_of(ts)


def _add_month(months: Months, key: tuple[str, date], usd: Decimal, tokens: int) -> None:
    sums = months.setdefault(key, [ZERO, 0])
    sums[0] += usd
    sums[1] += tokens


def _add_to_months(conn: Connection, months: Months) -> None:
    """The written entries' spend on their projects' monthly usage (one UPDATE per month)."""
    for project, month in sorted(months):  # one lock order for every writer
        usd, tokens = months[(project, month)]
        ledger.add_usage(conn, project, month, usd=usd, tokens=tokens)


def report_dropped(stale: list[Row]) -> None:
    if stale:
        structlog.get_logger("conveyor.logwriter").warning(
            "logwriter.costs_dropped",
            entries=len(stale),
            usd=str(sum((row[9] for row in stale), ZERO)),
            runs=sorted({f"{row[0]} attempt {row[-1]}" for row in stale})[:10],
            reason="the attempt that recorded them no longer owns the run",
        )


def is_row_fault(exc: BaseException) -> bool:
    """True when the rows themselves are refused, so retrying the same batch can never succeed.

    Anything else (database down, table missing, permissions) keeps the rows and is retried.
    """
    if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
        return True
    orig = getattr(exc, "orig", None) or exc  # StatementError wraps bind-time errors
    return isinstance(
        orig, psycopg.IntegrityError | psycopg.DataError | UnicodeError | TypeError | ValueError
    )


def reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
