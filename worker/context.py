"""`ctx`: what a running task sees: its run, and steps, logs, metrics, costs and cancellation."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from typing import Any, overload

from sqlalchemy import Engine, update

from domain.clock import Clock, utc_now
from domain.costs.prices import Prices
from domain.db.models import run_steps
from domain.errors import (
    BudgetExceeded,
    InvalidInput,
    RunCancelled,
    RunStopped,
    RunTimedOut,
    safe_str,
)
from domain.ports import Catalog
from domain.runs import lines
from domain.runs.requests import parse_duration
from domain.runs.store import Claim, RunStore, SqlRunStore
from domain.security.masking import NO_SECRETS, Masker
from worker.children import Child, gather, spawn_many
from worker.masked_sink import LineSink, MaskedSink
from worker.rates import Grant, RateLimits
from worker.spending import Spending
from worker.steps import StepRunner

STOP_ERRORS: dict[str, type[RunStopped]] = {
    "cancelled": RunCancelled,
    "timed_out": RunTimedOut,
    "budget_exceeded": BudgetExceeded,
}


class TaskContext(Spending, RateLimits):
    """Handed to every task as its first argument.

    Logs and metrics are buffered (cheap); steps are written at once, since people watch them
    live. Costs are written at once only where a limit must be checked before more money is
    spent (a run budget, a project limit, an open reservation); otherwise they are buffered
    with the logs and land, with the run's totals, before its final state.
    """

    def __init__(
        self,
        claim: Claim,
        *,
        engine: Engine,
        sink: LineSink,
        clock: Clock = utc_now,
        params: dict[str, Any] | None = None,
        prices: Prices | None = None,
        catalog: Catalog | None = None,
        store: RunStore | None = None,
    ) -> None:
        self._claim = claim
        #: Where checkpointed steps are written (the executor's run store).
        self._store: RunStore = store if store is not None else SqlRunStore(engine)
        #: What the names and params of the children this run spawns are checked against.
        self.catalog = catalog
        self._prices = prices or Prices({})
        self._engine = engine
        self._sink = sink
        self._clock = clock
        self.params: dict[str, Any] = params if params is not None else dict(claim.params)
        self._stop = threading.Event()
        self.stop_reason: str | None = None
        self.stop_detail: str = ""
        self._step_seq: int | None = None
        self._planned: dict[str, int] = {}
        self._lock = threading.Lock()
        # Whether cost entries can be buffered: decided at the first cost, from the claim and
        # the project's limits as they were then (one query per attempt, not per call). A limit
        # set later is checked from the next attempt, and in runs whose first cost comes later.
        self._buffer_costs: bool | None = None
        #: Open ctx.reserve() blocks, innermost last: costs inside one are recorded at once
        #: (never buffered) and settle it.
        self._reservations: list[int] = []
        self._masker = NO_SECRETS
        #: The step running now (its seq): costs recorded inside it carry it.
        self._current_step: int | None = None
        self._steps = StepRunner(self)
        #: Room taken with ctx.acquire: the oldest open one is settled by the next ctx.cost.
        self._grants: list[Grant] = []

    # -- identity ---------------------------------------------------------------------------
    @property
    def run_id(self) -> uuid.UUID:
        return self._claim.run_id

    @property
    def attempt(self) -> int:
        return self._claim.attempt

    @property
    def project(self) -> str:
        return self._claim.project

    @property
    def name(self) -> str:
        return self._claim.name

    # -- secrets ----------------------------------------------------------------------------
    def mask_secrets(self, masker: Masker) -> LineSink:
        """From now on mask `masker`'s values in everything the run records (lines, metrics,
        steps, costs; the executor masks its result and error); returns the masked sink for
        code that writes lines without going through the context."""
        self._masker = masker
        self._sink = MaskedSink(self._sink, masker)
        return self._sink

    @property
    def masker(self) -> Masker:
        """What the run masks: no secrets unless `mask_secrets` was called."""
        return self._masker

    # -- records ----------------------------------------------------------------------------
    def log(self, message: str, *, level: str = "info", **fields: Any) -> None:
        """A log line with optional key-value fields (`ctx.log("fetched", rows=120)`)."""
        self._sink.log(self.run_id, self.attempt, str(message), level=level, fields=fields or None)

    def metric(self, name: str, value: float, **labels: Any) -> None:
        self._sink.metric(self.run_id, name, float(value), labels or None)

    def _take_seq(self) -> int:
        with self._lock:
            if self._step_seq is None:
                with self._engine.connect() as conn:
                    self._step_seq = lines.next_seq(conn, run_steps, self.run_id)
            seq = self._step_seq
            self._step_seq += 1
            return seq

    def plan(self, *names: str, step_type: str = "step") -> None:
        """Record steps ahead as `planned`, so watchers see the road; `step(name)` later moves
        the planned row through running to completed or failed."""
        rows = []
        # What an earlier execution of the run left (after a retry, or a wake from a wait).
        history = self._steps.history()
        for name in map(self._masker, names):
            if name in history.names:
                continue  # a checkpointed step an earlier execution already has a row for
            if name in history.planned:
                self._planned[name] = history.planned[name]  # its plan stands
                continue
            seq = self._take_seq()
            self._planned[name] = seq
            rows.append(
                {
                    "run_id": self.run_id,
                    "seq": seq,
                    "attempt": self.attempt,
                    "name": name,
                    "step_type": step_type,
                    "status": "planned",
                }
            )
        if rows:
            with self._engine.begin() as conn:
                conn.execute(run_steps.insert(), rows)

    @overload
    def step(self, name: str, /, *, step_type: str = "step") -> AbstractContextManager[None]: ...

    @overload
    def step(
        self,
        name: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        retries: int = 0,
        backoff: str | float | timedelta = 1.0,
        step_type: str = "step",
        **kwargs: Any,
    ) -> Any: ...

    def step(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        /,
        *args: Any,
        retries: int = 0,
        backoff: str | float | timedelta = 1.0,
        step_type: str = "step",
        **kwargs: Any,
    ) -> Any:
        """`ctx.step(name, fn, *args, **kwargs)`: a checkpointed step. The first time the run
        gets here `fn(*args, **kwargs)` runs and its JSON result is stored with the step; a
        later attempt gets the stored result back without calling `fn`. `retries` tries it
        again in place (waiting `backoff`, doubling) before the attempt fails. See
        worker/steps.py for the rules (same order on every attempt; at least once).

        `with ctx.step(name):` is a visible step only: shown running, then completed or
        failed, and run again by every attempt."""
        if fn is None:
            if args or kwargs:
                raise InvalidInput(f"step {name!r}: arguments without a function to call")
            return self._visible_step(name, step_type)
        if not callable(fn):
            raise InvalidInput(f"step {name!r}: {fn!r} is not a function to call", field="step")
        return self._steps.run(
            name, fn, args, kwargs, retries=retries, backoff=backoff, step_type=step_type
        )

    def sleep(self, duration: str | float | timedelta) -> None:
        """Sleep without holding a worker: `ctx.sleep("10m")` ends this execution here, the run
        waits (`waiting`, reason `sleep`) until the time has passed, then runs again from the
        top, its completed checkpointed steps returning their results, and goes on after this
        call. A restart of workers or schedulers meanwhile changes nothing."""
        self.sleep_until(self._clock() + parse_duration(duration, field="sleep"))

    def sleep_until(self, when: datetime) -> None:
        """`sleep` until `when` (an aware datetime)."""
        if not isinstance(when, datetime) or when.tzinfo is None:
            raise InvalidInput(f"sleep_until: an aware datetime (got {when!r})", field="when")
        self._steps.sleep_until(when)

    def wait_for(self, name: str, timeout: str | float | timedelta | None = None) -> Any:
        """Wait for the signal `name` (`client.signal(run_id, name, payload)`, the API or
        `conveyor runs signal`) and return its payload, holding no worker meanwhile: the run
        waits (reason `signal:<name>`) and runs again from the top when the signal comes. A
        signal sent before the run gets here is kept and returned at once. After `timeout`
        (none: wait for ever) it raises WaitTimeout."""
        limit = None if timeout is None else parse_duration(timeout, field="timeout")
        return self._steps.wait_for(name, limit)

    def spawn(self, name: str, params: dict[str, Any] | None = None, **options: Any) -> Child:
        """Create a child run (`parent_run_id` = this run, this run's project unless
        `project=` says otherwise; other options as for `Client.enqueue`), once per spawning
        step: a replay returns the same child. `ctx.gather([child])` waits for it."""
        (child,) = spawn_many(
            self._steps,
            self,
            self.catalog,
            [{"name": name, "params": params or {}, **options}],
            step_name=f"spawn:{name}",
        )
        return child

    def spawn_many(self, items: Iterable[Mapping[str, Any]]) -> list[Child]:
        """Create many children in one batch (each item: `name`, `params`, options)."""
        return spawn_many(self._steps, self, self.catalog, list(items), step_name="spawn_many")

    def gather(self, children: Iterable[Child | uuid.UUID | str]) -> list[Any]:
        """Wait, holding no worker, until every child has ended; their results in order, or
        ChildFailed naming the children that did not succeed."""
        return gather(self._steps, self, children)

    @property
    def step_key(self) -> str:
        """Inside a checkpointed step, `<run id>:<step name>:<n>`: the same on every attempt
        that runs the step, to hand an external API as its idempotency key."""
        if self._steps.key is None:
            raise InvalidInput("ctx.step_key: only inside a checkpointed step (ctx.step(name, fn))")
        return self._steps.key

    def _enter_step(self, seq: int) -> int | None:
        outer, self._current_step = self._current_step, seq
        return outer

    def _leave_step(self, outer: int | None) -> None:
        self._current_step = outer

    @contextmanager
    def _visible_step(self, name: str, step_type: str) -> Iterator[None]:
        """A visible step: running while the block runs, then completed or failed (with why)."""
        name = self._masker(name)
        planned = self._planned.pop(name, None)
        # Taken before the transaction opens: on SQLite a second connection inside an open
        # write transaction would wait on itself.
        seq = planned if planned is not None else self._take_seq()
        with self._engine.begin() as conn:
            if planned is not None:
                conn.execute(
                    update(run_steps)
                    .where(run_steps.c.run_id == self.run_id, run_steps.c.seq == seq)
                    .values(status="running", started_at=self._clock())
                )
            else:
                conn.execute(
                    run_steps.insert().values(
                        run_id=self.run_id,
                        seq=seq,
                        attempt=self.attempt,
                        name=name,
                        step_type=step_type,
                        status="running",
                        started_at=self._clock(),
                    )
                )
        status, detail = "completed", None
        outer = self._enter_step(seq)
        try:
            yield
        except BaseException as exc:
            status, detail = "failed", self._masker(f"{type(exc).__name__}: {safe_str(exc)}")
            raise
        finally:
            self._leave_step(outer)
            with self._engine.begin() as conn:
                conn.execute(
                    update(run_steps)
                    .where(run_steps.c.run_id == self.run_id, run_steps.c.seq == seq)
                    .values(status=status, detail=detail, finished_at=self._clock())
                )

    # -- cancellation -----------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        """True once the run was asked to stop (cancel, timeout, budget): wind down soon."""
        return self._stop.is_set()

    def check_cancel(self) -> None:
        """Raise RunCancelled / RunTimedOut / BudgetExceeded if the run was asked to stop."""
        if self._stop.is_set() and self.stop_reason is not None:
            raise STOP_ERRORS[self.stop_reason](self.stop_detail or None)

    def heartbeat(self) -> None:
        """Tasks need not call this (the executor heartbeats); it only checks for a stop."""
        self.check_cancel()

    def stop(self, reason: str, detail: str = "") -> None:
        """Ask the task to stop (executor side): the first reason wins."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason, self.stop_detail = reason, detail
        self._stop.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early when the run is asked to stop; True if it was."""
        return self._stop.wait(seconds)
