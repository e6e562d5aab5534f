"""Two sessions at once in a test: a call in a thread of its own, and whether a session of the
test's PostgreSQL database is waiting for a lock another holds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `call` in a daemon thread; the dict gets its `value`, or the `error` it raised,
    for the test to assert on once it has joined the thread."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as exc:  # reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def waits_on_a_lock(engine: Engine) -> Callable[[], bool]:
    """A check for `eventually`: some session of this database waits for a lock."""

    def check() -> bool:
        with engine.connect() as conn:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        return bool(waiting)

    return check
