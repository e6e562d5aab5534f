"""Two things at once in a test: a call in a thread of its own, whether a session of the test's
PostgreSQL database is waiting for a lock another holds, a lock held by another thread, and a
forked child's exit code (or that it hung)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
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


def held_by_a_thread(lock: AbstractContextManager[Any]) -> tuple[threading.Event, threading.Thread]:
    """A thread that holds `lock` (entered as a `with` block) until the returned event is set;
    join the thread after setting it."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert holding.wait(5)
    return release, thread


def exit_code_of_child(body: Callable[[], object], *, timeout: float = 10.0) -> int | None:
    """Fork; the child runs `body()` and exits 0 (1 if it raised). The child's exit code, or
    None if it was still running after `timeout` (it is killed then)."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    return None
