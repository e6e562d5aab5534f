"""Keyed concurrency: at most `max` runs with one key run at any moment, across all workers.

`@task(concurrency=Limit(key="{repo}:{branch}", max=1))` gives each run a key made from its
params (a template naming params, or a function of them) when it is created; `concurrency_key=`
(and `concurrency_max=`) at enqueue override it. The key and its max are columns of the run.

The rule, in one place (`gate`), checked when a worker claims a keyed run, with the key locked
(an advisory lock on PostgreSQL; SQLite's single writer serialises claims anyway): the run may
start while the runs holding the key (running, lease not expired) plus the runs waiting for
it that came first are fewer than `max`. Otherwise it waits without holding a worker: status
`waiting`, reason `concurrency:<key>`, its attempt opened (a later claim goes on with it).

Slots are handed on, not polled for (`refill`): whenever a keyed run stops holding its slot
(it finished, failed, was retried, went to sleep, or its worker died and the reaper took the
run back), the same transaction makes the oldest waiters due, as many as there are free
slots, and the worker publishes them at once. A waiter's own wake time is only a net
(`NET_S`) should a hand-over be lost; FIFO holds within a key by creation time.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, select, tuple_, update

from domain.db import sql
from domain.db.capabilities import capabilities
from domain.db.models import runs
from domain.errors import ConfigurationError, InvalidInput
from domain.flow.parking import Wait, park
from domain.ports import Dispatch
from domain.runs.states import Status

#: The wait reason of a run waiting for a slot: this prefix and the key.
PREFIX = "concurrency:"
MAX_KEY = 200
MAX_SLOTS = 10_000
#: A waiter looks again this long after it began to wait, should its hand-over be lost.
NET_S = 300.0
#: The message priority of a run handed a slot (its stored priority is unchanged).
HANDED_ON_PRIORITY = 9

KeyFn = Callable[[Mapping[str, Any]], str]


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `max` runs of a key at once. `key`: a template over the task's params
    (`"{repo}:{branch}"`) or a function taking the params and returning the key."""

    key: str | KeyFn
    max: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.max, bool) or not isinstance(self.max, int):
            raise ConfigurationError(f"Limit.max: a whole number, got {self.max!r}")
        if not 1 <= self.max <= MAX_SLOTS:
            raise ConfigurationError(f"Limit.max: 1 to {MAX_SLOTS}, got {self.max}")
        if isinstance(self.key, str):
            names = template_fields(self.key)
            if not names:
                raise ConfigurationError(
                    f"Limit.key {self.key!r} names no param: every run would share one key; "
                    "give it {param} fields, or use max on the task's queue instead"
                )
        elif not callable(self.key):
            raise ConfigurationError(f"Limit.key: a template or a function, got {self.key!r}")

    def check_params(self, task: str, params: Iterable[str]) -> None:
        """At definition: every field of a template is a param of the task."""
        if not isinstance(self.key, str):
            return
        known = set(params)
        missing = [name for name in template_fields(self.key) if name not in known]
        if missing:
            has = ", ".join(sorted(known)) or "none"
            raise ConfigurationError(
                f"task {task!r}: concurrency key {self.key!r} names {', '.join(missing)}, "
                f"which is not a param of the task (its params: {has})"
            )

    def to_dict(self) -> dict[str, Any]:
        """As the task catalog publishes it: a function key is not shareable (None)."""
        return {"key": self.key if isinstance(self.key, str) else None, "max": self.max}


def template_fields(template: str) -> list[str]:
    """The param names a key template uses (`{repo}:{branch}` → repo, branch)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigurationError(f"Limit.key {template!r}: {exc}") from None
    names = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = field.split(".", 1)[0].split("[", 1)[0]
        if not name or not name.isidentifier():
            raise ConfigurationError(f"Limit.key {template!r}: {{{field}}} is not a param name")
        names.append(name)
    return names


def render(key: str | KeyFn | None, params: Mapping[str, Any], *, task: str) -> str:
    """The run's key from its (validated) params; InvalidInput naming what is wrong."""
    if key is None:
        raise InvalidInput(
            f"task {task!r} computes its concurrency key in code: enqueue it from a process "
            "that imports the task, or pass concurrency_key",
            field="concurrency_key",
        )
    try:
        value = key.format_map(params) if isinstance(key, str) else key(params)
    except (KeyError, AttributeError, IndexError) as exc:
        raise InvalidInput(
            f"concurrency key of task {task!r}: param {exc} is missing", field="params"
        ) from None
    return check_key(value)


def check_key(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY:
        raise InvalidInput(
            f"concurrency_key: text of 1 to {MAX_KEY} characters, got {value!r}",
            field="concurrency_key",
        )
    return value


def _holding(key: str, now: datetime) -> Any:
    return and_(
        runs.c.concurrency_key == key,
        runs.c.status == Status.RUNNING,
        runs.c.lease_expires_at >= now,
    )


def _waiting(key: str) -> Any:
    return and_(
        runs.c.concurrency_key == key,
        runs.c.status == Status.WAITING,
        runs.c.wait_reason == PREFIX + key,
    )


#: The gate's answer for a keyed run that may start (its key stays locked until commit).
PASSED = "passed"


def gate(
    conn: Connection, run_id: uuid.UUID, claimable: Any, *, now: datetime
) -> Wait | str | None:
    """For a claimable run: None if it has no key, PASSED if a slot is free for it; otherwise
    the run is written waiting for its key, here, and the Wait says so. The key stays locked
    until the caller's transaction ends, so the claim that follows cannot be overtaken."""
    row = conn.execute(
        select(
            runs.c.concurrency_key,
            runs.c.concurrency_max,
            runs.c.created_at,
            runs.c.status,
        ).where(runs.c.id == run_id, claimable)
    ).first()
    if row is None or row.concurrency_key is None:
        return None
    key, most = row.concurrency_key, row.concurrency_max or 1
    sql.lock_key(conn, PREFIX + key)
    holders = conn.execute(
        select(func.count()).where(_holding(key, now), runs.c.id != run_id)
    ).scalar_one()
    ahead = conn.execute(
        select(func.count()).where(
            _waiting(key),
            runs.c.id != run_id,
            tuple_(runs.c.created_at, runs.c.id) < tuple_(row.created_at, run_id),
        )
    ).scalar_one()
    if holders + ahead < most:
        return PASSED
    wake_at = now + timedelta(seconds=NET_S)
    opened = row.status == Status.WAITING
    turn = park(conn, run_id, claimable, opened=opened, reason=PREFIX + key, wake_at=wake_at)
    woken: list[Dispatch] = []
    if holders < most:
        # A slot is free but older runs wait for it: one of them may have come to the gate
        # after the slot's hand-over went to a younger one (deliveries are not in creation
        # order). Wake them now, or no one would until their net: the worker publishes them
        # (the relay, should it not).
        woken = refill(conn, key, most, now=now, publishing=False)
    detail = f"waits for concurrency key {key!r}: {holders} of {most} running, {ahead} ahead"
    return Wait(PREFIX + key, wake_at, detail, turn_queue=turn, woken=tuple(woken))


def refill(
    conn: Connection, key: str, most: int, *, now: datetime, publishing: bool
) -> list[Dispatch]:
    """Make the oldest waiters of `key` due, as many as there are free slots, in the caller's
    transaction (after it stopped holding a slot); their dispatches. `publishing`: the caller
    publishes them after commit (marked dispatched); otherwise the relay will. On PostgreSQL
    these steps are one call of `conveyor_key_refill` (migration 0018)."""
    if capabilities(conn).stored_functions:
        args = {"key": key, "most": most, "now": now, "publishing": publishing}
        return handed_on(conn.exec_driver_sql(REFILL_SQL, args).all())
    sql.lock_key(conn, PREFIX + key)
    holders = conn.execute(select(func.count()).where(_holding(key, now))).scalar_one()
    due = conn.execute(
        select(func.count()).where(_waiting(key), runs.c.not_before <= now)
    ).scalar_one()
    free = most - holders - due
    if free <= 0:
        return []
    oldest = (
        select(runs.c.id)
        .where(_waiting(key), runs.c.not_before > now)
        .order_by(runs.c.created_at, runs.c.id)
        .limit(free)
    )
    sent: dict[str, Any] = {"dispatched_at": None}
    if publishing:
        sent = {"dispatched_at": now, "dispatch_attempts": runs.c.dispatch_attempts + 1}
    woken = conn.execute(
        update(runs)
        .where(runs.c.id.in_(oldest))
        .values(not_before=now, **sent)
        .returning(runs.c.id, runs.c.name, runs.c.queue, runs.c.priority, runs.c.params)
    ).all()
    return handed_on(woken)


#: `refill` on PostgreSQL (migration 0018), in the driver's (psycopg's) parameter style:
#: sent as is here and by domain/runs/store_pg.py.
REFILL_SQL = (
    "SELECT id, name, queue, params "
    "FROM conveyor_key_refill(%(key)s, %(most)s, %(now)s, %(publishing)s)"
)


def handed_on(woken: Iterable[Any]) -> list[Dispatch]:
    """The dispatches of runs a refill made due (rows of id, name, queue, params). Sent at
    the top priority: the slot is kept for the run, and a message behind the queue's other
    work (up to a fair-share window of it) would leave the key idle meanwhile."""
    return [Dispatch(r[0], r[1], r[2], HANDED_ON_PRIORITY, r[3]) for r in woken]


def hand_on(
    conn: Connection, run_ids: Iterable[uuid.UUID], *, now: datetime, publishing: bool
) -> list[Dispatch]:
    """`refill` each key held by one of `run_ids` (runs that stopped holding, or waiters that
    will not take the slot they were handed), keys in order so two callers lock them alike."""
    ids = list(run_ids)
    if not ids:
        return []
    keys = conn.execute(
        select(runs.c.concurrency_key, runs.c.concurrency_max)
        .where(runs.c.id.in_(ids), runs.c.concurrency_key.is_not(None))
        .distinct()
    ).all()
    woken: list[Dispatch] = []
    for key, most in sorted(keys):
        woken.extend(refill(conn, key, most or 1, now=now, publishing=publishing))
    return woken
