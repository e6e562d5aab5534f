"""Recording schedule slots exactly once (guarantee 5), many schedules in one transaction.

Every slot due at one instant is recorded together: the schedules are locked, each slot gets
its `schedule_fires` row and, when it is enqueued, its run, all in one transaction, so one
commit and one broker publish serve a thousand schedules firing on the same second.

The UNIQUE(schedule_id, fire_at) row is the arbiter: the fires are inserted with ON CONFLICT
DO NOTHING RETURNING, and a slot another scheduler (a frozen leader waking up, a restart)
recorded first comes back `duplicate` and keeps nothing of ours, while the other slots of the
batch are recorded as usual.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from domain.db import sql
from domain.db.capabilities import capabilities
from domain.db.copy import copy_rows
from domain.db.models import runs
from domain.errors import ConveyorError
from domain.ports import Catalog, Dispatch, OpenCatalog
from domain.runs import lines
from domain.runs.repository import ON_KEY_CONFLICT
from domain.runs.requests import EnqueueRequest, build_request
from domain.runs.rows import run_row
from domain.runs.states import ACTIVE
from domain.schedules.definitions import HELD, fires, schedules

#: Longest silence inside a firing transaction: a staged batch waits up to a second for its
#: slot, and a standby takes over after about ten (scheduler/leader.py).
IDLE_S = 5


@dataclass(frozen=True)
class Due:
    """Slots of one schedule to record, oldest first, each `enqueue` or `skipped_misfire`,
    and the schedule's next fire time after them."""

    schedule_id: int
    planned: list[tuple[datetime, str]]
    next_fire_at: datetime | None


@dataclass(frozen=True)
class Fired:
    slot: datetime
    outcome: str  # enqueued | skipped_misfire | skipped_overlap | duplicate | failed | deferred
    run_id: Any = None
    dispatch: Any = None
    schedule_id: int | None = None
    error: str | None = None  # failed: why no run could be made (the slot is left unrecorded)


def plan_missed(
    slots: list[datetime], policy: str, limit: int | None
) -> list[tuple[datetime, str]]:
    """What each missed slot becomes under the misfire policy (oldest first)."""
    if policy == "run_once":
        return [(s, "skipped_misfire") for s in slots[:-1]] + [(s, "enqueue") for s in slots[-1:]]
    if policy == "catch_up":
        keep = limit or 0
        return [(s, "enqueue") for s in slots[:keep]] + [
            (s, "skipped_misfire") for s in slots[keep:]
        ]
    return [(s, "skipped_misfire") for s in slots]


def fire_once_each(
    engine: Engine,
    schedule_id: int,
    planned: list[tuple[datetime, str]],
    *,
    now: datetime,
    next_fire_at: datetime | None,
    catalog: Catalog | None = None,
    rng: Callable[[], float] = random.random,
) -> list[Fired]:
    """Record slots of one schedule and move its cursor; see `fire_many`."""
    dues = [Due(schedule_id, planned, next_fire_at)]
    fired = fire_many(engine, dues, now=now, catalog=catalog, rng=rng)
    advance_cursors(engine, dues, fired)
    return fired


def fire_many(
    engine: Engine,
    dues: Sequence[Due],
    *,
    now: datetime,
    catalog: Catalog | None = None,
    rng: Callable[[], float] = random.random,
    requests: RequestCache | None = None,
    before_commit: Callable[[list[Fired]], None] | None = None,
) -> list[Fired]:
    """Record the slots of many schedules in one transaction; return what became of each.

    A schedule paused or removed meanwhile records nothing. A slot already recorded by someone
    else is `duplicate`; a slot whose target can no longer be resolved is `failed` and left
    unrecorded (a restart then treats it as missed); neither disturbs the rest of the batch.
    The schedules' cursors are moved afterwards, by `advance_cursors`.

    `before_commit` stages the batch: the rows are written, then it is called with what they
    record (the scheduler builds the broker messages and waits there for the slot) and only
    then is the transaction committed, so nothing is visible before the slot and the work left
    at the slot is the commit and the send. Schedules whose
    overlap policy is not `allow` depend on what is active at the slot itself: they are left
    out and reported `deferred`, for the caller to fire once the slot has come.
    """
    if not dues:
        return []
    with engine.begin() as conn:
        if capabilities(conn).idle_timeouts:
            # A leader frozen (SIGSTOP) inside this transaction would hold the schedules'
            # locks, and the standby taking over would wait on them for as long as it stays
            # frozen: PostgreSQL ends the transaction after this much silence instead.
            conn.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = '{IDLE_S}s'"))
        batch = _Batch(conn, now, catalog or OpenCatalog(), rng, requests or RequestCache())
        found = batch.lock({d.schedule_id for d in dues})
        deferred: list[Fired] = []
        for due in dues:
            schedule = found.get(due.schedule_id)
            if schedule is None:
                continue
            if before_commit is not None and schedule["overlap_policy"] != "allow":
                deferred += [
                    Fired(s, "deferred", schedule_id=due.schedule_id) for s, _ in due.planned
                ]
                continue
            batch.add(schedule, due.planned)
        fired = batch.write()
        if before_commit is not None:
            before_commit(fired)
    return fired + deferred


class RequestCache:
    """A schedule's run request, built and validated once per version of the schedule rather
    than on every fire; only the slot's idempotency key differs between its runs. The target
    is still resolved through the catalog on every fire (a pipeline may have been disabled)."""

    def __init__(self) -> None:
        self._by_schedule: dict[int, tuple[Any, EnqueueRequest]] = {}

    def get(self, schedule: Any) -> EnqueueRequest:
        hit = self._by_schedule.get(schedule["id"])
        if hit is not None and hit[0] == schedule["updated_at"]:
            return hit[1]
        request = build_request(
            name=schedule["target_name"],
            params=schedule["params"],
            project=schedule["project"],
            queue=schedule["queue"],
            priority=schedule["priority"],
            kind=schedule["target_kind"],
            triggered_by="schedule",
            trigger_ref=f"schedule:{schedule['id']}",
        )
        self._by_schedule[schedule["id"]] = (schedule["updated_at"], request)
        return request


#: What firing reads of a schedule (its timing lives in the runner's plan).
_FIRING_COLUMNS = (
    "id", "enabled", "updated_at", "overlap_policy", "jitter_s", "target_kind", "target_name",
    "params", "project", "queue", "priority",
)  # fmt: skip


@dataclass
class _Slot:
    schedule_id: int
    slot: datetime
    outcome: str
    run: dict[str, Any] | None = None


@dataclass
class _Batch:
    conn: Connection
    now: datetime
    catalog: Catalog
    rng: Callable[[], float]
    requests: RequestCache
    slots: list[_Slot] = field(default_factory=list)
    failed: list[Fired] = field(default_factory=list)
    busy: set[str] = field(default_factory=set)  # trigger refs with a run still active

    def lock(self, ids: set[int]) -> dict[int, Any]:
        """The enabled schedules among `ids`, locked (in id order: two batches never deadlock)
        so that an edit, a pause or a manual fire waits for this batch."""
        query = (
            select(*(schedules.c[name] for name in _FIRING_COLUMNS))
            .where(sql.any_of(self.conn, schedules.c.id, sorted(ids)))
            .order_by(schedules.c.id)
        )
        query = sql.for_update(self.conn, query)
        found = {r["id"]: r for r in self.conn.execute(query).mappings() if r["enabled"]}
        guarded = [f"schedule:{i}" for i, r in found.items() if r["overlap_policy"] != "allow"]
        if guarded:
            self.busy = set(
                self.conn.execute(
                    select(runs.c.trigger_ref)
                    .where(runs.c.trigger_ref.in_(guarded), runs.c.status.in_(list(ACTIVE)))
                    .distinct()
                ).scalars()
            )
        return found

    def add(self, schedule: Any, planned: list[tuple[datetime, str]]) -> None:
        ref = f"schedule:{schedule['id']}"
        policy = schedule["overlap_policy"]
        for slot, action in planned:
            if action != "enqueue":
                self.slots.append(_Slot(schedule["id"], slot, action))
                continue
            active = policy != "allow" and ref in self.busy
            if active and policy == "skip":
                self.slots.append(_Slot(schedule["id"], slot, "skipped_overlap"))
                continue
            try:
                run = self._run_row(schedule, slot, held=active)
            except ConveyorError as exc:
                self.failed.append(
                    Fired(slot, "failed", schedule_id=schedule["id"], error=str(exc))
                )
                continue
            self.slots.append(_Slot(schedule["id"], slot, "enqueued", run))
            if policy != "allow":
                self.busy.add(ref)  # a later slot of this batch sees this run as active

    def _run_row(self, schedule: Any, slot: datetime, *, held: bool) -> dict[str, Any]:
        jitter_s = schedule["jitter_s"] * self.rng() if schedule["jitter_s"] else 0.0
        request = self.requests.get(schedule)
        row = run_row(request, self.catalog, self.now, publish_now=not held and not jitter_s)
        row["idempotency_key"] = f"schedule:{schedule['id']}:{slot.isoformat()}"
        if held:
            row["not_before"] = HELD  # overlap `queue`: released when the active run ends
        elif jitter_s:
            row["not_before"] = self.now + timedelta(seconds=jitter_s)
        return row

    def write(self) -> list[Fired]:
        """Runs first (the fires point at them), then the fires; a fire that loses to a row
        already there takes its run back out."""
        made = self._insert_runs([s.run for s in self.slots if s.run is not None])
        # A run not inserted: its idempotency key names a run already made for this very
        # slot, so the slot was fired before.
        candidates = [s for s in self.slots if s.run is None or s.run["id"] in made]
        claimed = self._insert_fires(candidates)
        lost = [s.run["id"] for s in candidates if s.run is not None and _key(s) not in claimed]
        if lost:
            lines.delete_runs(self.conn, lost)
        out: list[Fired] = []
        for s in self.slots:
            if _key(s) not in claimed or (s.run is not None and s.run["id"] not in made):
                out.append(Fired(s.slot, "duplicate", schedule_id=s.schedule_id))
            elif s.run is None:
                out.append(Fired(s.slot, s.outcome, schedule_id=s.schedule_id))
            else:
                run = s.run
                dispatch = None
                if run["dispatched_at"] is not None:
                    dispatch = Dispatch(
                        run["id"], run["name"], run["queue"], run["priority"], run["params"]
                    )
                out.append(Fired(s.slot, "enqueued", run["id"], dispatch, s.schedule_id))
        return out + self.failed

    def _insert_runs(self, rows: list[dict[str, Any]]) -> set[Any]:
        """The ids of the runs inserted; a run whose idempotency key exists is left out.

        On PostgreSQL the batch is COPYed (an INSERT of a thousand 28-column rows spends most
        of its time in the driver's parameter handling); COPY cannot skip a conflict, so in
        the rare batch that has one (a slot already fired elsewhere) it is undone to its
        savepoint and inserted row by row with ON CONFLICT DO NOTHING."""
        if not rows:
            return set()
        if capabilities(self.conn).copy:
            savepoint = self.conn.begin_nested()
            try:
                copy_rows(self.conn, runs, rows)
            except IntegrityError:
                savepoint.rollback()
            else:
                savepoint.commit()
                return {row["id"] for row in rows}
        stmt = (
            sql.insert(self.conn, runs)
            .on_conflict_do_nothing(**ON_KEY_CONFLICT)
            .returning(runs.c.id)
        )
        return set(self.conn.execute(stmt, rows).scalars())

    def _insert_fires(self, slots: list[_Slot]) -> set[tuple[int, datetime]]:
        """Insert the fires; return the (schedule, slot) pairs that were not there before."""
        if not slots:
            return set()
        ids = [s.schedule_id for s in slots]
        at = [s.slot for s in slots]
        outcomes = [s.outcome for s in slots]
        run_ids = [s.run["id"] if s.run is not None else None for s in slots]
        if capabilities(self.conn).arrays:
            # One statement with five array parameters: ON CONFLICT and RETURNING, without
            # the per-row parameters an executemany would carry.
            claimed = self.conn.execute(
                text(
                    "INSERT INTO schedule_fires (schedule_id, fire_at, outcome, run_id, "
                    "recorded_at) SELECT s, f, o, r, :now FROM unnest(CAST(:ids AS bigint[]), "
                    "CAST(:at AS timestamptz[]), CAST(:outcomes AS text[]), "
                    "CAST(:run_ids AS uuid[])) AS v(s, f, o, r) "
                    "ON CONFLICT (schedule_id, fire_at) DO NOTHING RETURNING schedule_id, fire_at"
                ),
                {"ids": ids, "at": at, "outcomes": outcomes, "run_ids": run_ids, "now": self.now},
            )
        else:
            stmt = (
                sql.insert(self.conn, fires)
                .on_conflict_do_nothing(index_elements=["schedule_id", "fire_at"])
                .returning(fires.c.schedule_id, fires.c.fire_at)
            )
            claimed = self.conn.execute(
                stmt,
                [
                    {
                        "schedule_id": i,
                        "fire_at": f,
                        "outcome": o,
                        "run_id": r,
                        "recorded_at": self.now,
                    }
                    for i, f, o, r in zip(ids, at, outcomes, run_ids, strict=True)
                ],
            )
        return {(r[0], _utc(r[1])) for r in claimed}


def _key(s: _Slot) -> tuple[int, datetime]:
    return s.schedule_id, _utc(s.slot)


def _utc(moment: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes; PostgreSQL aware ones."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def advance_cursors(engine: Engine, dues: Sequence[Due], fired: Sequence[Fired]) -> None:
    """Move each schedule's cursor (`last_fire_at`, `next_fire_at`) past its recorded slots.

    Its own short transaction, after the fires are committed and published, so a thousand
    schedules' updates do not delay their runs. Should the process die in between, a restart
    starts from the older cursor: the slots it then re-plans are in `schedule_fires` already
    and come back duplicate, so nothing fires twice. Schedules firing on the same instant share
    their new values: one UPDATE per distinct pair.
    """
    recorded = {(f.schedule_id, f.slot) for f in fired if f.outcome not in ("failed", "deferred")}
    groups: dict[tuple[datetime, datetime | None], list[int]] = {}
    for due in dues:
        slots = [s for s, _ in due.planned if (due.schedule_id, s) in recorded]
        if slots:
            groups.setdefault((max(slots), due.next_fire_at), []).append(due.schedule_id)
    if not groups:
        return
    with engine.begin() as conn:
        for (last, next_fire_at), ids in groups.items():
            conn.execute(
                update(schedules)
                .where(
                    sql.any_of(conn, schedules.c.id, ids),
                    # never backwards: a late duplicate must not reopen slots already past
                    or_(schedules.c.last_fire_at.is_(None), schedules.c.last_fire_at < last),
                )
                .values(last_fire_at=last, next_fire_at=next_fire_at)
            )
