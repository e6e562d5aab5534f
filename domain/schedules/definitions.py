"""Schedules: validated definitions, their fire times' cursor, and held runs.

Fire times come from a `SlotSource` (scheduler/triggers.py wraps APScheduler); recording a
slot exactly once (guarantee 5) is domain/schedules/fires.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy import Connection, Engine, Table, func, or_, select, text, update

from domain import storable
from domain.db.capabilities import capabilities
from domain.db.models import runs
from domain.db.models_platform import Schedule, ScheduleFire
from domain.errors import InvalidInput
from domain.runs.requests import NAME_PATTERN, Priority, invalid_from

schedules = cast(Table, Schedule.__table__)
fires = cast(Table, ScheduleFire.__table__)

#: Far future: a run held back by overlap policy `queue` until the previous one ends.
HELD = datetime(9999, 1, 1, tzinfo=UTC)
MAX_RECORDED_MISSES = 10_000
#: PostgreSQL NOTIFY channel: a schedule was added, edited, paused, resumed or removed.
CHANGES_CHANNEL = "conveyor_schedules"


class SlotSource(Protocol):
    def next_after(self, after: datetime) -> datetime | None: ...
    def between(self, after: datetime, until: datetime) -> Iterable[datetime]: ...


class ScheduleInput(BaseModel):
    """A schedule as a user defines it (CLI, API, code, pipeline.json)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    target: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    target_kind: Literal["task", "pipeline"] = "task"
    params: dict[str, Any] = Field(default_factory=dict)
    project: str = "default"
    queue: str | None = None
    priority: Priority | None = None
    trigger: Literal["cron", "interval", "once"]
    expression: str = Field(min_length=1, max_length=200)
    timezone: str = "UTC"
    start_at: datetime | None = None
    end_at: datetime | None = None
    misfire_policy: Literal["skip", "run_once", "catch_up"] = "skip"
    catch_up_limit: int | None = Field(None, ge=1, le=MAX_RECORDED_MISSES)
    overlap_policy: Literal["allow", "skip", "queue"] = "allow"
    jitter_s: float = Field(0.0, ge=0, le=3600)
    enabled: bool = True
    source: Literal["cli", "api", "code", "pipeline"] = "cli"

    @field_validator("start_at", "end_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone")
        return value

    @field_validator("params", "expression", "queue")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> Any:
        # Refused now, not at every fire: each run of the schedule would carry the value.
        return storable.refuse_unstorable(value, str(info.field_name))

    @classmethod
    def parse(cls, **fields: Any) -> ScheduleInput:
        try:
            spec = cls(**fields)
        except ValidationError as exc:
            raise invalid_from(exc) from None
        if spec.misfire_policy == "catch_up" and spec.catch_up_limit is None:
            raise InvalidInput(
                "misfire: catch_up needs a limit (catch_up:N), so a long outage cannot "
                "flood the queue",
                field="catch_up_limit",
            )
        if spec.start_at and spec.end_at and spec.end_at <= spec.start_at:
            raise InvalidInput("end: must be after start", field="end_at")
        return spec


def parse_misfire(text: str) -> tuple[str, int | None]:
    """`skip`, `run_once`, `catch_up` or `catch_up:N`."""
    match = re.fullmatch(r"(skip|run_once|catch_up)(?::(\d+))?", text.strip())
    if not match or (match.group(2) and match.group(1) != "catch_up"):
        raise InvalidInput(
            f"misfire: {text!r}; expected skip, run_once or catch_up:N", field="misfire_policy"
        )
    return match.group(1), int(match.group(2)) if match.group(2) else None


@dataclass(frozen=True)
class ScheduleView:
    row: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.row[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in self.row.items()}


def announce_change(conn: Connection) -> None:
    """Wake the leading scheduler (scheduler/changes.py) when this transaction commits; a
    rollback sends nothing. SQLite has no NOTIFY: the scheduler polls there."""
    if capabilities(conn).notify:
        conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANGES_CHANNEL})


def disable_missing(engine: Engine, source: str, keep: set[str], *, now: datetime) -> list[str]:
    """Declared schedules (code, pipeline) no longer declared are disabled, not kept firing."""
    with engine.begin() as conn:
        names = (
            conn.execute(
                select(schedules.c.name).where(schedules.c.source == source, schedules.c.enabled)
            )
            .scalars()
            .all()
        )
        gone = [n for n in names if n not in keep]
        if gone:
            conn.execute(
                update(schedules)
                .where(schedules.c.name.in_(gone))
                .values(enabled=False, updated_at=now)
            )
            announce_change(conn)
        return gone


def enabled_behind(
    engine: Engine, *, before: datetime, among: Iterable[int] = ()
) -> list[tuple[int, str, datetime | None]]:
    """(id, name, next_fire_at) of the enabled schedules whose next fire is before `before`,
    and of the enabled ones among `among`: what the scheduler's watchdog looks at."""
    ids = sorted(set(among))
    behind = schedules.c.next_fire_at < before
    where = behind if not ids else or_(behind, schedules.c.id.in_(ids))
    with engine.connect() as conn:
        rows = conn.execute(
            select(schedules.c.id, schedules.c.name, schedules.c.next_fire_at)
            .where(schedules.c.enabled, where)
            .order_by(schedules.c.id)
        )
        return [(r[0], r[1], r[2]) for r in rows]


def changes_marker(engine: Engine) -> tuple[Any, int]:
    """Cheap fingerprint of the schedules table: changes when any schedule is edited."""
    with engine.connect() as conn:
        row = conn.execute(select(func.max(schedules.c.updated_at), func.count())).one()
        return row[0], int(row[1])


# -- held runs ----------------------------------------------------------------------------
def release_held(engine: Engine, *, now: datetime) -> int:
    """Overlap `queue`: a held run becomes due once no other run of its schedule is active."""
    with engine.begin() as conn:
        held = conn.execute(
            select(runs.c.id, runs.c.trigger_ref)
            .where(
                runs.c.status == "pending",
                runs.c.not_before == HELD,
                runs.c.trigger_ref.like("schedule:%"),
            )
            .order_by(runs.c.created_at)
        ).all()
        released = 0
        seen: set[str] = set()
        for run_id, ref in held:
            if ref in seen:
                continue
            seen.add(ref)
            busy = conn.execute(
                select(runs.c.id)
                .where(runs.c.trigger_ref == ref, runs.c.status == "running")
                .limit(1)
            ).first()
            if busy is None:
                conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id)
                    .values(not_before=now, dispatched_at=None)
                )
                released += 1
        return released
