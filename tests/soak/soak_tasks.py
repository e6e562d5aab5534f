"""The fault soak's tasks (CONVEYOR_TASK_MODULES): each writes what it did to a marks file.

A run's marks file (`$SOAK_MARKS_DIR/<run id>`) gets `start A P` when attempt A begins and
`done A P` when its body has completed, P being the worker's process group: the invariant
checker reads them to tell a body completed twice from one whose worker was killed under it.
Files, not a table, so a mark is written even while PostgreSQL is down.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from conveyor import task

#: Enough attempts that a run outlives every fault of the soak: kills and outages cost attempts
#: (a lease lost is an attempt used), and the outcome must still be the one the task dictates.
ATTEMPTS = 8
RETRY = {"max_attempts": ATTEMPTS, "retry_backoff": 0.2, "retry_backoff_max": 1.0}
LOG_LINES = 20
SPEND_USD = "0.01"


class Flaky(Exception):
    """The first attempt of soak_flaky fails on purpose."""


def _mark(ctx: Any, phase: str) -> None:
    path = Path(os.environ["SOAK_MARKS_DIR"]) / str(ctx.run_id)
    with path.open("a") as f:  # one short O_APPEND write: lines never interleave
        f.write(f"{phase} {ctx.attempt} {os.getpgid(0)}\n")


@task(**RETRY)
def soak_short(ctx, i: int = 0) -> dict[str, int]:  # type: ignore[no-untyped-def]
    _mark(ctx, "start")
    ctx.log("short ran", i=i)
    _mark(ctx, "done")
    return {"i": i}


@task(**RETRY, timeout=60)
def soak_long(ctx, seconds: float = 2.0) -> str:  # type: ignore[no-untyped-def]
    _mark(ctx, "start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.check_cancel()
        ctx.wait(0.05)
    _mark(ctx, "done")
    return "long done"


@task(**RETRY)
def soak_flaky(ctx) -> int:  # type: ignore[no-untyped-def]
    """Fails on its first attempt, succeeds on the next."""
    _mark(ctx, "start")
    if ctx.attempt == 1:
        raise Flaky("first attempt fails")
    _mark(ctx, "done")
    return int(ctx.attempt)


@task(max_attempts=2, retry_backoff=0.2, retry_backoff_max=0.4)
def soak_fails(ctx) -> None:  # type: ignore[no-untyped-def]
    _mark(ctx, "start")
    raise ValueError(f"always fails (attempt {ctx.attempt})")


@task(**RETRY)
def soak_logs(ctx, i: int = 0) -> int:  # type: ignore[no-untyped-def]
    _mark(ctx, "start")
    with ctx.step("log"):
        for n in range(LOG_LINES):
            ctx.log("line", n=n, i=i)
    _mark(ctx, "done")
    return LOG_LINES


@task(**RETRY)
def soak_spend(ctx) -> str:  # type: ignore[no-untyped-def]
    """Reserves before it spends and spends within the reservation, as a careful task does."""
    _mark(ctx, "start")
    with ctx.reserve(usd=SPEND_USD):
        ctx.wait(0.5)  # the call takes a while: a worker killed now holds the reservation
        ctx.cost(provider="soak", model="m", tokens_in=10, tokens_out=5, usd=SPEND_USD)
    _mark(ctx, "done")
    return SPEND_USD
