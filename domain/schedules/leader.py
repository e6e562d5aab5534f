"""The scheduler leader's heartbeat, so that whoever depends on a leader can tell when none
leads.

The relay, the reaper and the schedules run only in a leading `conveyor scheduler`: without
one, retries, delayed runs, chains and the recovery of runs whose worker died all wait, and
nothing else would say so. The leader rewrites one `sweep_cursors` row every few seconds;
workers warn and `/readyz` reports not ready once it is older than the silence allowed
(CONVEYOR_NO_SCHEDULER_AFTER_S). Times are the processes' clocks, as leases are: hosts are
expected to agree on the time within seconds.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine

from domain.db import cursors

CURSOR = "scheduler.leader"


def beat_every(silence_s: float) -> float:
    """How often the leader beats: several times within the silence allowed, at most every 5 s."""
    return min(5.0, silence_s / 3)


def beat(engine: Engine, *, now: datetime) -> None:
    """The leader is alive and sweeping, as of `now`."""
    with engine.begin() as conn:
        cursors.move(conn, CURSOR, now, now)


def last_beat(engine: Engine) -> datetime | None:
    with engine.connect() as conn:
        return cursors.read(conn, CURSOR)


def absence(engine: Engine, *, now: datetime, since: datetime, silence_s: float) -> str | None:
    """What is wrong, in a sentence, when no scheduler has led for `silence_s` (counted from
    `since`, when the caller started, if that is later than the last beat); else None."""
    seen = last_beat(engine)
    quiet = (now - max(seen, since) if seen is not None else now - since).total_seconds()
    if quiet < silence_s:
        return None
    when = f"last seen {seen.isoformat(timespec='seconds')}" if seen else "none seen yet"
    return (
        f"no scheduler has led for {quiet:.0f} s ({when}): retries, delayed runs, chains and "
        "the recovery of runs whose worker died wait until `conveyor scheduler` runs"
    )
