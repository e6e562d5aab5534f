"""Tasks the end-to-end tests run in real worker processes (CONVEYOR_TASK_MODULES)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from conveyor import Limit, limits, task


@task
def noop(ctx, i: int = 0) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with ctx.step("work"):
        ctx.log("noop ran", i=i)
    return {"i": i}


@task(max_attempts=3)
def side_effect(ctx, marks: str, seconds: float = 0.0) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Appends `start N` when it begins and `done N` when it completes, to a file."""
    path = Path(marks)
    with path.open("a") as f:
        f.write(f"start {ctx.attempt}\n")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.wait(0.05)
    with path.open("a") as f:
        f.write(f"done {ctx.attempt}\n")
    return {"attempt": ctx.attempt}


@task(max_attempts=3)
def reserves(ctx, marks: str, usd: str, seconds: float = 0.0) -> str:  # type: ignore[no-untyped-def]
    """Reserves `usd`, appends `start N` inside the reservation, waits, then spends it all."""
    with ctx.reserve(usd=usd):
        with Path(marks).open("a") as f:
            f.write(f"start {ctx.attempt}\n")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ctx.wait(0.05)
        ctx.cost(provider="e2e", model="m", usd=usd)
    return usd


@task
def waits(ctx, seconds: float = 30.0) -> str:  # type: ignore[no-untyped-def]
    """Cooperative: stops as soon as it is asked to."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.check_cancel()
        ctx.wait(0.05)
    return "waited"


@task(timeout=1.0)
def stuck(ctx) -> str:  # type: ignore[no-untyped-def]
    """Ignores every stop: only ending its process stops it."""
    time.sleep(60)
    return "never"


@task(max_attempts=3, retry_backoff=0.2, retry_backoff_max=0.4)
def always_fails(ctx) -> None:  # type: ignore[no-untyped-def]
    raise ValueError(f"failure on attempt {ctx.attempt}")


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("carries a lock")
        self.lock = threading.Lock()


@task
def raises_unpicklable(ctx) -> None:  # type: ignore[no-untyped-def]
    raise Unpicklable()


@task
def returns_object(ctx) -> object:  # type: ignore[no-untyped-def]
    return {"obj": object()}


@task
def heap_frozen(ctx) -> int:  # type: ignore[no-untyped-def]
    """How many objects the worker process froze out of the garbage collector's reach."""
    import gc

    return gc.get_freeze_count()


@task
def signs_in(ctx, user: str, api_token: str) -> str:  # type: ignore[no-untyped-def]
    """Takes a secret as a param: what shows the run (Flower, worker logs) must mask it."""
    return f"signed in {user}"


@task
def llm_calls(ctx, calls: int = 2, usd: str = "0.01", pause: float = 0.05) -> int:  # type: ignore[no-untyped-def]
    """`calls` priced calls, as an agent makes them: a pause (the request), then its cost."""
    for _ in range(calls):
        time.sleep(pause)
        ctx.cost(provider="llm", model="small", tokens_in=10, tokens_out=10, usd=usd)
    return calls


def _paid_step(ctx, marks: str, n: int, hold: float) -> str:  # type: ignore[no-untyped-def]
    """One paid step: its call is marked, its model call costs, and after step 2 it holds on
    (long enough for a test to kill the worker there)."""
    with Path(marks).open("a") as f:
        f.write(f"call {n} attempt {ctx.attempt} key {ctx.step_key}\n")
    ctx.cost(provider="llm", model="small", tokens_in=10 * n, tokens_out=1, usd="0.01")
    return f"output {n}"


@task(max_attempts=3)
def four_paid_steps(ctx, marks: str, hold: float = 0.0) -> list[str]:  # type: ignore[no-untyped-def]
    """Four checkpointed steps; after step 2 completed the first attempt waits `hold` s."""
    outputs = []
    for n in (1, 2, 3, 4):
        outputs.append(ctx.step("call", _paid_step, ctx, marks, n, hold))
        if n == 2 and ctx.attempt == 1:
            with Path(marks).open("a") as f:
                f.write("after step 2\n")
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline:
                ctx.wait(0.05)
    return outputs


@task(max_attempts=1)
def naps(ctx, seconds: float = 2.0) -> str:  # type: ignore[no-untyped-def]
    """Sleeps without holding its worker, then finishes."""
    ctx.sleep(seconds)
    return "rested"


@task(max_attempts=2)
def child_square(ctx, n: int) -> int:  # type: ignore[no-untyped-def]
    """A child of parent_of_many. Two attempts: one the test's kill -9 ends mid-run goes on in
    its second (with one, a child caught running by the kill fails its parent)."""
    return n * n


@task(max_attempts=3)
def parent_of_many(ctx, marks: str, n: int) -> int:  # type: ignore[no-untyped-def]
    """Spawns `n` children in one batch, notes it, and gathers them."""
    children = ctx.spawn_many(
        {"name": "child_square", "params": {"n": i}, "queue": "kids"} for i in range(n)
    )
    with Path(marks).open("a") as f:
        f.write(f"spawned attempt {ctx.attempt}\n")
    return sum(ctx.gather(children))


def _flaky_call(marks: str) -> str:
    """Fails on its first two tries (counted in the marks file), then answers."""
    path = Path(marks)
    tries = len(path.read_text().splitlines()) + 1 if path.exists() else 1
    with path.open("a") as f:
        f.write(f"try {tries}\n")
    if tries <= 2:
        raise ConnectionError(f"provider hiccup {tries}")
    return "answer"


@task(max_attempts=1)
def flaky_step(ctx, marks: str) -> str:  # type: ignore[no-untyped-def]
    """One step that raises twice, then succeeds, inside retries=2."""
    return ctx.step("call", _flaky_call, marks, retries=2, backoff=0.05)  # type: ignore[no-any-return]


@task(max_attempts=2)
def changes_course(ctx) -> str:  # type: ignore[no-untyped-def]
    """Attempt 1 checkpoints "plan" then fails; attempt 2 reaches "draft" first."""
    if ctx.attempt == 1:
        ctx.step("plan", lambda: "planned")
        raise RuntimeError("first attempt fails after its step")
    ctx.step("draft", lambda: "drafted")
    return "unreachable"


@task(max_attempts=1)
def awaits_approval(ctx, timeout: float = 60.0) -> object:  # type: ignore[no-untyped-def]
    """Waits for two approvals in turn (no worker held) and returns their payloads."""
    first = ctx.wait_for("approval", timeout=timeout)
    second = ctx.wait_for("approval", timeout=timeout)
    return [first, second]


@task(max_attempts=1)
def slow_child(ctx, seconds: float) -> str:  # type: ignore[no-untyped-def]
    ctx.sleep(seconds)
    return "late"


@task(max_attempts=1)
def parent_of_slow(ctx, n: int) -> object:  # type: ignore[no-untyped-def]
    """Spawns `n` children that sleep a minute and gathers them."""
    kids = ctx.spawn_many(
        {"name": "slow_child", "params": {"seconds": 60}, "queue": "kids"} for _ in range(n)
    )
    return ctx.gather(kids)


@task(max_attempts=1, concurrency=Limit(key="{key}", max=1))
def one_per_key(ctx, key: str, seconds: float = 0.05, marks: str = "") -> str:  # type: ignore[no-untyped-def]
    """At most one run per key at once; notes its start (and end) in `marks` when given."""
    if marks:
        with Path(marks).open("a") as f:
            f.write(f"start {ctx.run_id}\n")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.wait(0.01)
    if marks:
        with Path(marks).open("a") as f:
            f.write(f"done {ctx.run_id}\n")
    return key


#: Shared by every worker of tests/e2e/test_rate_limits.py (written to the database at start).
limits.define("e2e-llm", requests_per_minute=20, tokens_per_minute=5_000)


def _note_call(marks: str, grant: object, actual: int) -> None:
    """One line per model call: the second the limit counted it in, its estimate and actual."""
    line = json.dumps(
        {
            "second": grant.second,  # type: ignore[attr-defined]
            "requests": grant.requests,  # type: ignore[attr-defined]
            "estimate": grant.tokens,  # type: ignore[attr-defined]
            "actual": actual,
            "pid": os.getpid(),
            "t": time.time(),
        }
    )
    with Path(marks).open("a") as f:  # one write of one short line: appends do not interleave
        f.write(line + "\n")


@task(queue="rated", rate_limit="e2e-llm")
def rated_call(ctx, marks: str, actual: int, estimate: int) -> int:  # type: ignore[no-untyped-def]
    """One request as it starts (its rate_limit), then the tokens of one model call."""
    grant = ctx.acquire("e2e-llm", tokens=estimate, requests=0)
    _note_call(marks, grant, actual)  # before cost, which raises once a cancel came
    ctx.cost("e2e", "model", tokens_in=actual, usd="0")
    return actual


@task(queue="rated")
def rated_agent(ctx, marks: str, calls: list[int], margin: int) -> int:  # type: ignore[no-untyped-def]
    """Several model calls in one run, each a request and an estimate of its tokens."""
    for actual in calls:
        grant = ctx.acquire("e2e-llm", tokens=actual + margin, timeout="10m")
        _note_call(marks, grant, actual)
        ctx.cost("e2e", "model", tokens_in=actual // 2, tokens_out=actual - actual // 2, usd="0")
    return len(calls)


@task(queue="fair")
def fair_job(ctx, i: int) -> int:  # type: ignore[no-untyped-def]
    """A short run of tests/e2e/test_fair_share.py."""
    time.sleep(0.005)
    return i
