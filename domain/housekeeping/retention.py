"""Retention: finished runs past their age go, with everything hanging off them (optionally
archived first).

Which runs may go: a finished run whose `finished_at` is older than its cutoff (per project and
status, `retention_cutoffs`). Unfinished runs are never touched.

How they go differs by storage (`capabilities(...).partitioned_history`):
- Where run_logs and run_metrics are partitioned by day of run id (PostgreSQL, migration
  0019), a day whose every run may go goes whole: its runs are deleted and its partitions
  dropped, in one transaction, instead of deleting its lines one by one. A day that still has a
  run to keep (unfinished, or finished after its cutoff) keeps its partitions, and every line
  in them: nothing of a kept run is lost. So that days can go whole, a run that may go waits for
  its day while that day can still go: it is deleted row by row (with its lines) only once it
  was created more than a day before its cutoff's day, i.e. at most about two days after its
  cutoff (a run left unfinished for long, or the DEFAULT partition's runs).
- Elsewhere (SQLite) runs are deleted `batch` at a time, their lines with them.

Each delete is a short transaction, and retention rests after each one (`rest` times as long as
it took, 5 by default): the database's writes go on meanwhile, so a worker beside it keeps its
share. The scheduler gives it a slice of its loop at a time (`until`).
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from time import perf_counter
from time import sleep as wait
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, String, and_, column, select, values
from sqlalchemy.exc import OperationalError

from domain.db import partitions
from domain.db.capabilities import capabilities
from domain.db.models import projects, run_logs, runs
from domain.db.types import UTCDateTime
from domain.runs import lines
from domain.runs.states import TERMINAL
from domain.runs.views import jsonable

log = structlog.get_logger("conveyor.maintenance")

Cutoffs = dict[tuple[str, str], datetime]
#: PostgreSQL's "lock not available": a drop gave up waiting (partitions.drop's lock timeout).
LOCK_NOT_AVAILABLE = "55P03"


def retention_cutoffs(
    default_days: float, rules: dict[str, float], projects: Iterable[str], now: datetime
) -> Cutoffs:
    """Cutoff per (project, status): "project:status" beats "project" beats "*:status" beats
    the default."""
    out = {}
    for project in projects:
        for status in TERMINAL:
            days = rules.get(
                f"{project}:{status}", rules.get(project, rules.get(f"*:{status}", default_days))
            )
            out[(project, status)] = now - timedelta(days=days)
    return out


#: How many times as long as each transaction took retention sleeps after it. Deleting runs
#: takes database CPU a busy worker beside it needs: resting 7x gives retention about an eighth
#: of the time. Measured on 2 cores (bench/history.py, a year of 10 M runs and 100 M lines),
#: resting 7x it deleted 1.26 M runs a minute while the worker kept its throughput (1.06x, within
#: the worker's own noise); resting 5x, 1.60 M a minute but the worker kept 0.88x.
REST = 7.0


def apply_retention(
    engine: Engine,
    *,
    now: datetime,
    default_days: float,
    rules: dict[str, float] | None = None,
    archive_dir: Path | None = None,
    batch: int = 500,
    max_batches: int = 20,
    rest: float = REST,
    sleep: Callable[[float], None] = wait,
    until: float | None = None,
) -> int:
    """Delete finished runs past their age (the module docstring says which and how); returns
    how many went. Row by row, `batch` per short transaction and at most `max_batches` per
    cutoff per call; a day's partitions go whole, as many days as may go. After each
    transaction it sleeps `rest` times as long as the transaction took; past `until` (a
    `time.perf_counter()` value) it starts no more transactions, and the next call goes on."""
    with engine.connect() as conn:
        # Every run's project is one of these (runs.project is a key to projects): reading
        # the few projects is cheaper than finding the distinct ones among millions of runs.
        names = list(conn.execute(select(projects.c.name)).scalars())
    cutoffs = retention_cutoffs(default_days, rules or {}, names, now)
    by_day = capabilities(engine).partitioned_history
    pause = _Rest(rest, sleep, until)
    deleted = _drop_days(engine, cutoffs, archive_dir, now, pause) if by_day and cutoffs else 0
    for (project, status), cutoff in sorted(cutoffs.items()):
        if pause.over():
            break
        which = and_(
            runs.c.project == project, runs.c.status == status, runs.c.finished_at < cutoff
        )
        if by_day:  # while its day can still go whole, a run waits for it
            which = and_(which, runs.c.created_at < _day_start(cutoff) - timedelta(days=1))
        for _ in range(max_batches):
            if pause.over():
                break
            with pause, _read_committed(engine) as conn, conn.begin():
                ids = list(conn.execute(select(runs.c.id).where(which).limit(batch)).scalars())
                if not ids:
                    break
                if archive_dir is not None:
                    _archive(conn, ids, archive_dir, now)
                # Children of a deleted run keep their history; their link is cleared.
                conn.execute(
                    runs.update().where(runs.c.parent_run_id.in_(ids)).values(parent_run_id=None)
                )
                deleted += lines.delete_runs(conn, ids)
    if deleted:
        log.info("retention.deleted", runs=deleted)
    return deleted


def make_coming_days(engine: Engine, *, now: datetime) -> int:
    """Where history is partitioned: the partitions of yesterday through
    `partitions.AHEAD_DAYS` ahead (and of any day whose rows wait in DEFAULT), before rows
    arrive for them; how many were made."""
    if not capabilities(engine).partitioned_history:
        return 0
    with engine.begin() as conn:
        made = partitions.ensure(conn, today=now.astimezone(UTC).date())
    if made:
        log.info("retention.partitions_made", partitions=made)
    return made


class _Rest:
    """A context manager that sleeps, when its block ends, `rest` times as long as the block
    took: a pause after each transaction, so the other writers' transactions get the database
    (and the locks retention's rows share with them) that long. `over()`: past `until`."""

    def __init__(self, rest: float, sleep: Callable[[float], None], until: float | None) -> None:
        self.rest = rest
        self.sleep = sleep
        self.until = until
        self.started = 0.0

    def over(self) -> bool:
        return self.until is not None and perf_counter() >= self.until

    def __enter__(self) -> None:
        self.started = perf_counter()

    def __exit__(self, *exc: object) -> None:
        took = perf_counter() - self.started
        if self.rest > 0 and exc[0] is None:
            self.sleep(took * self.rest)


def _day_start(when: datetime) -> datetime:
    return datetime.combine(when.astimezone(UTC).date(), time(), tzinfo=UTC)


def _drop_days(
    engine: Engine, cutoffs: Cutoffs, archive_dir: Path | None, now: datetime, pause: _Rest
) -> int:
    """Each day all of whose runs may go: its runs deleted, its partitions dropped. A day can
    only be whole once its end is behind the newest cutoff."""
    newest = max(cutoffs.values())
    with engine.connect() as conn:
        days = partitions.day_partitions(conn)
    cut = values(
        column("project", String),
        column("status", String),
        column("cutoff", UTCDateTime()),
        name="cut",
    ).data(sorted((project, status, at) for (project, status), at in cutoffs.items()))
    deleted = 0
    for day in days:
        if datetime.combine(day.day + timedelta(days=1), time(), tzinfo=UTC) > newest:
            break
        if pause.over():
            break
        try:
            with pause:
                deleted += _drop_day(engine, day, cut, archive_dir, now)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            # Its tables stayed busy past the lock timeout: the next pass tries again.
            log.info("retention.day_busy", day=str(day.day))
    return deleted


class _DayChanged(Exception):
    """A run of the day appeared while it was being deleted: the day stays, for now."""


def _drop_day(
    engine: Engine,
    day: partitions.DayPartition,
    cut: Any,
    archive_dir: Path | None,
    now: datetime,
) -> int:
    """The day's runs deleted and its partitions dropped, if none of its runs is to be kept;
    how many runs went."""
    in_day = and_(runs.c.id >= day.low, runs.c.id < day.high)
    by_rule = and_(cut.c.project == runs.c.project, cut.c.status == runs.c.status)
    # Never NULL, so its negation holds for every run to keep (no cutoff: not finished).
    may_go = and_(
        cut.c.cutoff.is_not(None),
        runs.c.finished_at.is_not(None),
        runs.c.finished_at < cut.c.cutoff,
    )
    try:
        with _read_committed(engine) as conn, conn.begin():
            kept = conn.execute(
                select(runs.c.id)
                .select_from(runs.outerjoin(cut, by_rule))
                .where(in_day, ~may_go)
                .limit(1)
            ).first()
            if kept is not None:
                return 0
            if archive_dir is not None:
                ids = list(conn.execute(select(runs.c.id).where(in_day)).scalars())
                for start in range(0, len(ids), 1000):
                    _archive(conn, ids[start : start + 1000], archive_dir, now)
            # Children of a deleted run keep their history; their link is cleared.
            conn.execute(
                runs.update()
                .where(runs.c.parent_run_id >= day.low, runs.c.parent_run_id < day.high)
                .values(parent_run_id=None)
            )
            # Deleting a run waits for any writer holding it for its lines (FOR KEY SHARE);
            # one that comes later finds no run and writes nothing. The day's lines then go
            # with their partitions in this transaction: none outlives its run. Finished runs
            # only, and none may be left: a run made since the check keeps the day.
            gone = conn.execute(runs.delete().where(in_day, runs.c.finished_at.is_not(None)))
            if conn.execute(select(runs.c.id).where(in_day).limit(1)).first() is not None:
                raise _DayChanged
            partitions.drop(conn, day)
    except _DayChanged:
        return 0
    log.info("retention.day_dropped", day=str(day.day), runs=gone.rowcount)
    return int(gone.rowcount)


def _read_committed(engine: Engine) -> Connection:
    """A connection whose transactions are READ COMMITTED whatever the defaults (server or
    engine): `lines.delete_runs` relies on a snapshot per statement."""
    conn = engine.connect()
    if capabilities(engine).read_committed:
        conn.execution_options(isolation_level="READ COMMITTED")
    return conn


def _archive(conn: Connection, ids: list[Any], directory: Path, now: datetime) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"runs-{now:%Y%m%d}.jsonl.gz"
    logs_by_run: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for line in conn.execute(
        select(run_logs).where(run_logs.c.run_id.in_(ids)).order_by(run_logs.c.seq)
    ).mappings():
        logs_by_run[line["run_id"]].append(
            {k: jsonable(v) for k, v in line.items() if k != "run_id"}
        )
    with gzip.open(path, "at", encoding="utf-8") as out:
        for run in conn.execute(select(runs).where(runs.c.id.in_(ids))).mappings():
            record = {k: jsonable(v) for k, v in run.items()}
            record["logs"] = logs_by_run.get(run["id"], [])
            out.write(json.dumps(record, default=str) + "\n")
