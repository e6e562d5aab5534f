"""Read-side queries for the status API: a run's detail, metrics, costs; workers.
(A run's artifacts are read in domain/runs/artifacts.py.)"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, cast

from sqlalchemy import Engine, Table, func, select

from domain.db.models import RunMetric, Worker, cost_entries, run_logs, runs
from domain.db.models_platform import Webhook
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput, RunNotFound
from domain.runs.repository import LOG_LINE_COLUMNS, RunFilter
from domain.runs.states import TERMINAL
from domain.runs.views import LogLine, Page, RunView, StepView, jsonable_fields
from domain.security import audit

run_metrics = cast(Table, RunMetric.__table__)
webhooks = cast(Table, Webhook.__table__)
workers = cast(Table, Worker.__table__)

MAX_POINTS = 10_000


@dataclass(frozen=True, slots=True)
class CostLine:
    """Spend grouped by provider and model (or one entry, in a run's cost listing)."""

    provider: str
    model: str
    tokens_in: int
    tokens_out: int
    requests: int
    cost_usd: Decimal
    ts: datetime | None = None
    step_seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable_fields(self)


def masked(view: RunView) -> RunView:
    """The run as people and clients are shown it (API, dashboard): its params and result with
    every secret-looking entry as *** (DESIGN.md, guarantee 8: secrets never leak). The run
    as stored, unmasked, is what a worker executes."""
    params, result = audit.mask(view.params), audit.mask(view.result)
    if params == view.params and result == view.result:
        return view
    return replace(view, params=params, result=result)


@dataclass(frozen=True, slots=True)
class RunDetail:
    run: RunView
    steps: list[StepView]
    log_lines: int
    costs: list[CostLine]

    def masked(self) -> RunDetail:
        """This detail with its run `masked`."""
        return replace(self, run=masked(self.run))

    def to_dict(self) -> dict[str, Any]:
        run = self.run
        data = run.to_dict()
        data["duration_s"] = run.duration_s
        data["steps"] = [
            {
                **step.to_dict(),
                "duration_s": step.duration_s,
                "replayed": step.replayed(run.attempt),
            }
            for step in self.steps
        ]
        data["totals"] = {
            "cost_usd": str(run.cost_usd),
            "tokens_in": run.tokens_in,
            "tokens_out": run.tokens_out,
            "requests": run.requests_made,
            "log_lines": self.log_lines,
            "steps": _count_by_status(self.steps),
        }
        data["costs"] = [
            {k: v for k, v in line.to_dict().items() if k not in ("ts", "step_seq")}
            for line in self.costs
        ]
        return data


def _count_by_status(steps: list[StepView]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.status] = counts.get(step.status, 0) + 1
    return counts


def run_detail(uow: UnitOfWork, run_id: uuid.UUID) -> RunDetail:
    """The run with its steps, its number of log lines and its spend per provider and model."""
    lines = (
        select(func.count())
        .select_from(run_logs)
        # The id itself, not the outer row's: run_logs is partitioned by run id on PostgreSQL,
        # and only a value the planner knows prunes the count to one partition.
        .where(run_logs.c.run_id == run_id)
        .scalar_subquery()
        .label("log_lines")
    )
    with uow:
        # The run and its log line count in one statement: three round trips, not four.
        row = uow.conn.execute(select(runs, lines).where(runs.c.id == run_id)).mappings().first()
        if row is None:
            raise RunNotFound(f"no run with id {run_id}", run_id=str(run_id))
        steps = uow.runs.steps(run_id)
        entries = _cost_entries(uow, run_id)
    return RunDetail(
        run=RunView.from_row(row),
        steps=steps,
        log_lines=int(row["log_lines"]),
        costs=_by_model(entries),
    )


def _by_model(entries: list[CostLine]) -> list[CostLine]:
    """Entries summed per provider and model, in Python: money is text on SQLite, and a run's
    entries are few."""
    sums: dict[tuple[str, str], CostLine] = {}
    for e in entries:
        s = sums.get((e.provider, e.model))
        sums[(e.provider, e.model)] = (
            CostLine(e.provider, e.model, e.tokens_in, e.tokens_out, e.requests, e.cost_usd)
            if s is None
            else CostLine(
                e.provider,
                e.model,
                s.tokens_in + e.tokens_in,
                s.tokens_out + e.tokens_out,
                s.requests + e.requests,
                s.cost_usd + e.cost_usd,
            )
        )
    return [sums[key] for key in sorted(sums)]


def _cost_entries(uow: UnitOfWork, run_id: uuid.UUID) -> list[CostLine]:
    stmt = (
        select(
            cost_entries.c.provider,
            cost_entries.c.model,
            cost_entries.c.tokens_in,
            cost_entries.c.tokens_out,
            cost_entries.c.requests,
            cost_entries.c.cost_usd,
            cost_entries.c.ts,
            cost_entries.c.step_seq,
        )
        .where(cost_entries.c.run_id == run_id)
        .order_by(cost_entries.c.ts, cost_entries.c.seq)
    )
    return [CostLine(**row) for row in uow.conn.execute(stmt).mappings()]


def run_costs(uow: UnitOfWork, run_id: uuid.UUID) -> tuple[list[CostLine], dict[str, Any]]:
    """Every cost entry of the run, oldest first, and their exact total."""
    with uow:
        uow.runs.get(run_id)
        entries = _cost_entries(uow, run_id)
    total = {
        "cost_usd": str(sum((e.cost_usd for e in entries), Decimal(0))),
        "tokens_in": sum(e.tokens_in for e in entries),
        "tokens_out": sum(e.tokens_out for e in entries),
        "requests": sum(e.requests for e in entries),
    }
    return entries, total


@dataclass(frozen=True, slots=True)
class MetricPoint:
    ts: datetime
    name: str
    value: float
    labels: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return jsonable_fields(self)


def run_metric_points(
    uow: UnitOfWork, run_id: uuid.UUID, *, name: str | None = None, limit: int = 1000
) -> list[MetricPoint]:
    """The run's metric samples in time order, optionally of one name."""
    if not 1 <= limit <= MAX_POINTS:
        raise InvalidInput(f"limit: must be between 1 and {MAX_POINTS}", field="limit")
    stmt = (
        select(run_metrics.c.ts, run_metrics.c.name, run_metrics.c.value, run_metrics.c.labels)
        .where(run_metrics.c.run_id == run_id)
        .order_by(run_metrics.c.ts, run_metrics.c.id)
        .limit(limit)
    )
    if name is not None:
        stmt = stmt.where(run_metrics.c.name == name)
    with uow:
        uow.runs.get(run_id)
        return [MetricPoint(**row) for row in uow.conn.execute(stmt).mappings()]


@dataclass(frozen=True, slots=True)
class AttemptSpan:
    """One attempt of a run as its log lines place it: first and last line, and how many."""

    attempt: int
    first_ts: datetime
    last_ts: datetime
    lines: int


def attempt_spans(uow: UnitOfWork, run_id: uuid.UUID) -> list[AttemptSpan]:
    """Each attempt that wrote a log line, in order (the run's lines are indexed by run)."""
    stmt = (
        select(
            run_logs.c.attempt,
            func.min(run_logs.c.ts),
            func.max(run_logs.c.ts),
            func.count(),
        )
        .where(run_logs.c.run_id == run_id)
        .group_by(run_logs.c.attempt)
        .order_by(run_logs.c.attempt)
    )
    with uow:
        return [AttemptSpan(*row) for row in uow.conn.execute(stmt).all()]


@dataclass(frozen=True, slots=True)
class Tail:
    """One poll of a followed run: lines after a seq, and whether the run has ended."""

    lines: list[LogLine]
    status: str

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def tail(uow: UnitOfWork, run_id: uuid.UUID, *, after_seq: int, limit: int = 500) -> Tail:
    """The status is read before the lines: a run's last lines commit with its final state,
    so once a terminal status is seen, the following read has every line."""
    with uow:
        status = uow.runs.get(run_id).status
        return Tail(uow.runs.logs(run_id, after_seq=after_seq, limit=limit), status)


def last_logs(uow: UnitOfWork, run_id: uuid.UUID, *, limit: int = 200) -> list[LogLine]:
    """The run's last `limit` log lines, oldest first (RunNotFound if there is no run)."""
    stmt = (
        select(*LOG_LINE_COLUMNS)
        .where(run_logs.c.run_id == run_id)
        .order_by(run_logs.c.seq.desc())
        .limit(limit)
    )
    with uow:
        uow.runs.get(run_id)
        lines = [LogLine(**row) for row in uow.conn.execute(stmt).mappings()]
    return lines[::-1]


def child_runs(uow: UnitOfWork, run_id: uuid.UUID, *, limit: int = 100) -> list[RunView]:
    """Runs whose parent is `run_id` (spawned children, retries), oldest first."""
    stmt = (
        select(*[runs.c[name] for name in RunView.field_names()])
        .where(runs.c.parent_run_id == run_id)
        .order_by(runs.c.created_at, runs.c.id)
        .limit(limit)
    )
    with uow:
        return [RunView(*row) for row in uow.conn.execute(stmt)]


#: A worker writes its row every 5 s (worker/lifecycle.py); three missed beats: lost.
WORKER_LOST_AFTER_S = 15.0


def worker_state(*, stopped: bool, heartbeat_at: datetime, now: datetime) -> str:
    """alive (heartbeating), stopped (said goodbye) or lost (silent past three beats)."""
    if stopped:
        return "stopped"
    silent = (now - heartbeat_at).total_seconds()
    return "alive" if silent < WORKER_LOST_AFTER_S else "lost"


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker process as last seen. `running` is what it last reported, and None unless it
    is alive: a lost worker's runs are not being run (the reaper hands them back)."""

    id: str
    hostname: str
    pid: int
    queues: Any
    started_at: datetime
    heartbeat_at: datetime
    running: int | None
    stopped: bool
    state: str

    def to_dict(self) -> dict[str, Any]:
        return jsonable_fields(self)


def list_workers(
    uow: UnitOfWork, *, include_stopped: bool = False, now: datetime | None = None
) -> list[WorkerView]:
    """Workers by host; each with its state as of `now` (default: the unit of work's clock)."""
    stmt = select(workers).order_by(workers.c.hostname, workers.c.id)
    if not include_stopped:
        stmt = stmt.where(workers.c.stopped.is_(False))
    at = now or uow.clock()
    with uow:
        rows = uow.conn.execute(stmt).mappings().all()
    views = []
    for row in rows:
        state = worker_state(stopped=row["stopped"], heartbeat_at=row["heartbeat_at"], now=at)
        running = row["running"] if state == "alive" else None
        views.append(WorkerView(**{**row, "running": running, "state": state}))
    return views


class RunReads(Protocol):
    """The API's busiest reads: the runs page, a run's detail, and the webhook intake's
    endpoint lookup. `domain.storage.run_reads` picks the implementation for a database, once;
    tests/integration/test_run_reads_contract.py holds every one to the same answers."""

    def page(self, filters: RunFilter, *, limit: int = 50, cursor: str | None = None) -> Page:
        """Runs newest first, `limit` at most, after `cursor` (a page's `next_cursor`)."""
        ...

    def detail(self, run_id: uuid.UUID) -> RunDetail:
        """The run with its steps, log line count and cost per model; RunNotFound if none."""
        ...

    def last_lines(self, run_id: uuid.UUID, *, limit: int = 200) -> list[LogLine]:
        """The run's last `limit` log lines, oldest first; RunNotFound if there is no run."""
        ...

    def webhook_rows(self, names: list[str]) -> list[dict[str, Any]]:
        """The enabled webhooks among `names`, each row by column name, secret still encrypted
        (`domain.webhooks.inbound.endpoints_of` makes them endpoints)."""
        ...

    def close(self) -> None:
        """Release connections of its own."""
        ...


class SqlRunReads:
    """RunReads over SQLAlchemy, each read without a transaction: every database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def page(self, filters: RunFilter, *, limit: int = 50, cursor: str | None = None) -> Page:
        with UnitOfWork(self.engine, read_only=True) as uow:
            return uow.runs.page(filters, limit=limit, cursor=cursor)

    def detail(self, run_id: uuid.UUID) -> RunDetail:
        return run_detail(UnitOfWork(self.engine, read_only=True), run_id)

    def last_lines(self, run_id: uuid.UUID, *, limit: int = 200) -> list[LogLine]:
        return last_logs(UnitOfWork(self.engine, read_only=True), run_id, limit=limit)

    def webhook_rows(self, names: list[str]) -> list[dict[str, Any]]:
        with UnitOfWork(self.engine, read_only=True) as uow:
            rows = uow.conn.execute(
                select(webhooks).where(webhooks.c.name.in_(names), webhooks.c.enabled.is_(True))
            ).mappings()
            return [dict(row) for row in rows]

    def close(self) -> None:
        """Nothing of its own: the engine's pool belongs to whoever made the engine."""
