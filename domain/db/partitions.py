"""run_logs and run_metrics by day on PostgreSQL: which partitions exist, making the coming
days' ones, and dropping a day's.

Migration 0019 partitions both tables by range of `run_id`, one range per UTC day: a run id
is a uuid7, whose first 48 bits are the millisecond it was made, so a day's runs are one range
of ids and every line and metric of a run lives in its creation day's partition. A DEFAULT
partition takes rows no day partition covers; `ensure` moves them out when it makes their day.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import Connection, text

#: The partitioned tables, in the order their partitions are dropped.
TABLES = ("run_logs", "run_metrics")
#: Days ahead kept ready: the scheduler may be down this long before rows land in DEFAULT.
AHEAD_DAYS = 7

_NAME = re.compile(rf"^({'|'.join(TABLES)})_(p\d{{8}}|default)$")


def is_partition(name: str) -> bool:
    """Whether `name` is one of the partitions (not a table of the models)."""
    return _NAME.match(name) is not None


def day_floor(day: date) -> uuid.UUID:
    """The smallest uuid7 made on `day` (UTC): the lower bound of that day's partition."""
    ms = int(datetime.combine(day, time(), tzinfo=UTC).timestamp() * 1000)
    return uuid.UUID(int=ms << 80)


@dataclass(frozen=True, slots=True)
class DayPartition:
    """The partitions of one UTC day (one per partitioned table that has it)."""

    day: date
    tables: tuple[str, ...]

    @property
    def low(self) -> uuid.UUID:
        return day_floor(self.day)

    @property
    def high(self) -> uuid.UUID:
        return day_floor(self.day + timedelta(days=1))


def ensure(conn: Connection, *, today: date, ahead_days: int = AHEAD_DAYS) -> int:
    """Make the partitions of yesterday through `ahead_days` ahead, and of any day whose rows
    wait in a DEFAULT partition (moving them there); how many were made."""
    days = {today + timedelta(days=n) for n in range(-1, ahead_days + 1)}
    made = 0
    for table in TABLES:
        waiting = conn.execute(
            text(
                f"SELECT DISTINCT conveyor_run_id_day(run_id) FROM {table}_default"
                " WHERE conveyor_run_id_day(run_id) IS NOT NULL"
            )
        ).scalars()
        for day in sorted(days | set(waiting)):
            made += bool(
                conn.execute(
                    text("SELECT conveyor_ensure_partition(:table, :day)"),
                    {"table": table, "day": day},
                ).scalar()
            )
    return made


def day_partitions(conn: Connection) -> list[DayPartition]:
    """The days that have partitions, oldest first."""
    rows = conn.execute(
        text(
            "SELECT p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid"
            " JOIN pg_class t ON t.oid = i.inhparent WHERE t.relname = ANY(:tables)"
        ),
        {"tables": list(TABLES)},
    ).scalars()
    by_day: dict[date, list[str]] = {}
    for name in rows:
        table, _, suffix = name.rpartition("_")
        if suffix.startswith("p") and suffix[1:].isdigit():
            by_day.setdefault(datetime.strptime(suffix[1:], "%Y%m%d").date(), []).append(table)
    return [DayPartition(day, tuple(sorted(by_day[day]))) for day in sorted(by_day)]


def drop(conn: Connection, partition: DayPartition) -> None:
    """Drop the day's partitions in the caller's transaction (held by a short lock timeout:
    a drop waits for the table's readers and writers, and they for it)."""
    conn.execute(text("SET LOCAL lock_timeout = '2s'"))
    for table in TABLES:
        if table in partition.tables:
            conn.execute(text(f"DROP TABLE {table}_p{partition.day:%Y%m%d}"))
