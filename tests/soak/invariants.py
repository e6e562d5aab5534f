"""What must hold after the soak has settled, each check returning the problems it found.

The checks read the database (runs, logs, schedule fires, costs, dead letters), the marks
files the soak's tasks write (tests/soak/soak_tasks.py) and a pg_dump of the whole database.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from domain.costs.ledger import month_of, usage
from domain.db.models import cost_entries, dead_letters, run_logs, runs
from domain.runs.states import TERMINAL
from tests.leaks import found_in
from tests.schedule_slots import assert_every_slot_once, fires_and_runs
from tests.services import PrivatePostgres
from tests.soak.soak_tasks import LOG_LINES, SPEND_USD

#: What each planned run must end as (by task name): the outcome its task dictates.
OUTCOMES = {
    "soak_short": {"succeeded"},
    "soak_long": {"succeeded"},
    "soak_flaky": {"succeeded"},
    "soak_fails": {"failed"},
    "soak_logs": {"succeeded"},
    "soak_spend": {"succeeded", "budget_exceeded"},
    "with_secret": {"succeeded"},
}
LINES = {"soak_short": 1, "soak_logs": LOG_LINES}


@dataclass
class Facts:
    """What the soak did, as the checks need it."""

    engine: Engine
    postgres: PrivatePostgres
    marks: Path
    planned: dict[str, str]  # idempotency key -> task name, for every run the soak enqueued
    killed_groups: set[int]
    #: (run id, attempt) whose final write gave up: the database was down longer than the lease
    unrecordable: set[tuple[str, int]]
    poisons: list[bytes]
    schedules: list[Any]  # ScheduleViews
    paused_at: datetime
    project: str
    limit_usd: Decimal
    secret: str
    problems: dict[str, list[str]] = field(default_factory=dict)


def _rows(engine: Engine) -> list[Any]:
    cols = runs.c
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(
                    cols.id,
                    cols.name,
                    cols.status,
                    cols.attempt,
                    cols.idempotency_key,
                    cols.trigger_ref,
                    cols.project,
                    cols.error_type,
                )
            )
        )


def every_run_terminal(facts: Facts) -> list[str]:
    waiting = [r for r in _rows(facts.engine) if r.status not in TERMINAL]
    return [
        f"{len(waiting)} runs not terminal, e.g. {w.id} {w.name} {w.status}" for w in waiting[:1]
    ]


def none_lost(facts: Facts) -> list[str]:
    """Every planned run exists once and ended as its task dictates; schedule runs succeeded."""
    by_key = {r.idempotency_key: r for r in _rows(facts.engine) if r.idempotency_key}
    problems = [
        f"planned run {k} ({n}) was never written"
        for k, n in facts.planned.items()
        if k not in by_key
    ]
    for key, name in facts.planned.items():
        row = by_key.get(key)
        if row is not None and row.status not in OUTCOMES[name]:
            problems.append(f"{key} ({row.id}) ended {row.status} ({row.error_type})")
    for row in _rows(facts.engine):
        if (row.trigger_ref or "").startswith("schedule:") and row.status != "succeeded":
            problems.append(f"schedule run {row.id} ended {row.status} ({row.error_type})")
    return problems


def _marks(path: Path) -> list[tuple[str, int, int]]:
    if not path.exists():
        return []
    return [
        (p, int(a), int(g))
        for p, a, g in (line.split() for line in path.read_text().split("\n") if line)
    ]


def no_double_completion(facts: Facts) -> list[str]:
    """No attempt started twice; a run's body completed more than once only when the earlier
    completions could not be recorded: their worker was killed, or the database stayed down
    past the lease while the worker tried to record it (`run.finish_failed`: by design the
    reaper then gives the run another attempt); a succeeded run's recorded attempt is one whose
    body completed."""
    problems = []
    for row in _rows(facts.engine):
        if not row.name.startswith("soak_"):
            continue
        marks = _marks(facts.marks / str(row.id))
        starts = [a for p, a, _ in marks if p == "start"]
        if len(starts) != len(set(starts)):
            problems.append(f"{row.id}: an attempt started twice: {marks}")
        done = [(a, g) for p, a, g in marks if p == "done"]
        if row.status == "succeeded" and row.attempt not in {a for a, _ in done}:
            problems.append(
                f"{row.id}: succeeded as attempt {row.attempt} without doing it: {marks}"
            )
        unrecorded = [(a, g) for a, g in done if a != row.attempt or row.status != "succeeded"]
        lost = {(a, g) for a, g in unrecorded if (str(row.id), a) not in facts.unrecordable}
        if any(g not in facts.killed_groups for _, g in lost):
            problems.append(
                f"{row.id}: completed by an attempt not recorded ({row.status} "
                f"as attempt {row.attempt}), in a worker not killed: {marks}"
            )
    return problems


def logs_complete(facts: Facts) -> list[str]:
    """The succeeded attempt of each logging run wrote all its lines, once."""
    with facts.engine.connect() as conn:
        counted = conn.execute(
            select(runs.c.id, runs.c.name, func.count().label("lines"))
            .join(
                run_logs, (run_logs.c.run_id == runs.c.id) & (run_logs.c.attempt == runs.c.attempt)
            )
            .where(runs.c.status == "succeeded", runs.c.name.in_(list(LINES)))
            .group_by(runs.c.id, runs.c.name)
        ).all()
        succeeded = conn.execute(
            select(func.count()).where(runs.c.status == "succeeded", runs.c.name.in_(list(LINES)))
        ).scalar_one()
    wrong = [f"{r.id} {r.name}: {r[2]} lines" for r in counted if r[2] != LINES[r.name]]
    if len(counted) != succeeded:
        wrong.append(f"{succeeded - len(counted)} succeeded runs without log lines")
    return wrong


def schedule_fires_exact(facts: Facts) -> list[str]:
    """Every slot from each schedule's creation to its pause recorded once, no gap, one run
    per enqueued slot; missed slots only as the misfire policy says."""
    problems = []
    for view in facts.schedules:
        try:
            outcomes = assert_every_slot_once(facts.engine, view)
        except AssertionError as exc:
            problems.append(f"{view.name}: {exc}")
            continue
        slots, _ = fires_and_runs(facts.engine, view.id)
        last = slots[-1][0]
        if last < facts.paused_at - timedelta(seconds=2):
            problems.append(
                f"{view.name}: slots missing from {last} to the pause at {facts.paused_at}"
            )
        allowed = {"enqueued", "skipped_misfire"}
        if set(outcomes) - allowed:
            problems.append(f"{view.name}: outcomes {set(outcomes)}")
    return problems


def spend_within_limit(facts: Facts) -> list[str]:
    """The project's month never passes its limit, every reservation is given back, and its
    spend is the sum of its cost entries."""
    month = month_of(facts.paused_at)
    with facts.engine.connect() as conn:
        row = conn.execute(
            select(usage.c.cost_usd, usage.c.reserved_usd).where(
                usage.c.project == facts.project, usage.c.month == month
            )
        ).one()
        entries = conn.execute(
            select(func.coalesce(func.sum(cost_entries.c.cost_usd), 0)).where(
                cost_entries.c.project == facts.project
            )
        ).scalar_one()
        paid = conn.execute(
            select(func.count()).where(
                runs.c.project == facts.project, runs.c.status == "succeeded"
            )
        ).scalar_one()
    spent, reserved = Decimal(row.cost_usd), Decimal(row.reserved_usd)
    problems = []
    if spent > facts.limit_usd:
        problems.append(f"spent {spent} USD of a {facts.limit_usd} USD limit")
    if reserved != 0:
        problems.append(f"{reserved} USD still reserved with every run finished")
    if Decimal(entries) != spent:
        problems.append(f"month says {spent} USD, its entries {entries} USD")
    if spent < paid * Decimal(SPEND_USD):
        problems.append(f"{paid} runs succeeded but only {spent} USD was recorded")
    return problems


def poison_dead_lettered(facts: Facts) -> list[str]:
    with facts.engine.connect() as conn:
        bodies = [
            base64.b64decode(b["raw"])
            for b in conn.execute(select(dead_letters.c.body)).scalars()
            if isinstance(b, dict) and "raw" in b
        ]
    return [
        f"poison {raw!r} dead-lettered {bodies.count(raw)} times"
        for raw in facts.poisons
        if bodies.count(raw) != 1
    ]


def no_secret_in_dump(facts: Facts) -> list[str]:
    """The pipeline used the secret (its careless print is in the logs, masked), and no form of
    its plain text is anywhere in a dump of the database."""
    dump = subprocess.run(
        [
            str(facts.postgres.BIN / "pg_dump"),
            "-h",
            "127.0.0.1",
            "-p",
            str(facts.postgres.port),
            "-U",
            "postgres",
            "postgres",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    if "the token is ***" not in dump:  # the pipeline printed it, and it was masked
        return ["no run of with_secret logged its masked secret: the secret was never used"]
    return [f"the secret appears in pg_dump as {form!r}" for form in found_in(dump, [facts.secret])]


def finish_failed(logs: Path) -> set[tuple[str, int]]:
    """(run id, attempt) of every `run.finish_failed` event in the workers' JSON logs."""
    found = set()
    for path in logs.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"run.finish_failed"' in line:
                event = json.loads(line)
                found.add((str(event["run_id"]), int(event["attempt"])))
    return found


CHECKS: list[Callable[[Facts], list[str]]] = [
    every_run_terminal,
    none_lost,
    no_double_completion,
    logs_complete,
    schedule_fires_exact,
    spend_within_limit,
    poison_dead_lettered,
    no_secret_in_dump,
]


def check(facts: Facts) -> dict[str, list[str]]:
    """Each invariant's problems (an empty list: it held)."""
    results = {}
    for invariant in CHECKS:
        try:
            results[invariant.__name__] = invariant(facts)
        except Exception as exc:  # a check that cannot run has not held
            results[invariant.__name__] = [f"check failed: {exc!r}"]
    return results
