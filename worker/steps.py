"""Checkpointed steps as a task calls them: `ctx.step(name, fn, *args, **kwargs)`.

The first time a run reaches a step, `fn` runs and its JSON result is stored with the step,
fenced by attempt, as the step is marked completed. A later attempt of the run (after a worker
died, or the task raised further on) reaches the same step and gets the stored result back
without `fn` being called. Rules (the README's "Checkpointed steps"):
- determinism: an attempt must reach the run's completed steps in the order they completed;
  reaching another step where the history has one is NonDeterministicStep, which fails the
  run (retrying would meet the same code);
- at least once: a step interrupted before its completion was recorded runs again, with the
  same `ctx.step_key`, which is what to hand an external API as its idempotency key;
- a step's result is what the database keeps: JSON, with the run's secrets masked; the value a
  first call returns is the same JSON (tuples come back as lists), secrets unmasked;
- steps do not nest: a checkpointed step inside another one is refused.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine

from domain.errors import (
    InvalidInput,
    LeaseLost,
    NonDeterministicStep,
    RunStopped,
    WaitTimeout,
    safe_str,
)
from domain.runs import signals, steps
from domain.runs.requests import parse_duration
from domain.runs.store import RunStore
from domain.security.masking import Masker

#: The longest pause between two tries of a step retried in place.
MAX_BACKOFF_S = 300.0


class Suspend(BaseException):
    """Raised by `ctx.sleep`: this execution stops, and the run waits (holding no worker)
    until `until`, then runs again from the top, replaying its completed steps. A
    BaseException, so that a task's `except Exception` does not swallow it."""

    def __init__(self, until: datetime, reason: str) -> None:
        super().__init__(f"{reason} until {until.isoformat()}")
        self.until, self.reason = until, reason


class StepHost(Protocol):
    """What the runner needs of the task's context (worker/context.py: TaskContext)."""

    _engine: Engine
    _store: RunStore
    _clock: Callable[[], datetime]
    _planned: dict[str, int]

    @property
    def run_id(self) -> uuid.UUID: ...

    @property
    def attempt(self) -> int: ...

    @property
    def project(self) -> str: ...

    @property
    def masker(self) -> Masker: ...

    @property
    def cancelled(self) -> bool: ...

    def _take_seq(self) -> int: ...

    def _enter_step(self, seq: int) -> int | None: ...

    def _leave_step(self, outer: int | None) -> None: ...

    def wait(self, seconds: float) -> bool: ...

    def check_cancel(self) -> None: ...

    def stop(self, reason: str, detail: str = "") -> None: ...


class StepRunner:
    """One attempt's checkpointed steps: its position in the run's history, and the step
    running now."""

    def __init__(self, ctx: StepHost) -> None:
        self.ctx = ctx
        self._history: steps.History | None = None
        self._position = 0  # how many of the history's completed steps this attempt reached
        self._occurrences: dict[str, int] = {}
        self.key: str | None = None  # the running step's step_key

    def history(self) -> steps.History:
        if self._history is None:
            with self.ctx._engine.connect() as conn:
                self._history = steps.history(conn, self.ctx.run_id)
        return self._history

    def run(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        retries: int,
        backoff: str | float | timedelta,
        step_type: str,
    ) -> Any:
        ctx = self.ctx
        if type(retries) is not int or not 0 <= retries <= 100:
            raise InvalidInput(f"retries: a whole number from 0 to 100 (got {retries!r})")
        base_s = parse_duration(backoff, field="backoff").total_seconds()
        name = ctx.masker(str(name))
        occurrence, done = self.reach(name)
        if done is not None:
            return done.result

        seq, earlier = self._row_for(self.history(), name, occurrence)
        started = ctx._clock()
        self.key = f"{ctx.run_id}:{name}:{occurrence}"
        outer = ctx._enter_step(seq)
        call = _Call(seq, name, occurrence, step_type, started, earlier)
        try:
            result = self._call(call, fn, args, kwargs, retries=retries, base_s=base_s)
        finally:
            ctx._leave_step(outer)
            self.key = None
        return self._complete(call, result)

    def sleep_until(self, when: datetime) -> None:
        """A durable sleep: a checkpointed step that records when it ends, then Suspend. The
        run reaches it again when it wakes, and goes on once that time has come."""
        ctx = self.ctx
        occurrence, done = self.reach("sleep")
        if done is not None:
            until = datetime.fromisoformat(done.result["until"])
        else:
            until = when
            self.settle(
                "sleep",
                occurrence,
                "sleep",
                status="completed",
                result={"until": until.isoformat()},
            )
        if until > ctx._clock():
            raise Suspend(until, "sleep")

    def wait_for(self, name: str, timeout: timedelta | None) -> Any:
        """Wait for the signal `name`: a checkpointed step that records its deadline, then
        consumes the oldest such signal the run has (storing its payload in the step, so
        later attempts get the same one), or suspends until one comes or the deadline."""
        ctx = self.ctx
        signals.check_name(name)
        step_name = f"wait_for:{name}"
        now = ctx._clock()
        occurrence, done = self.reach(step_name)
        if done is not None:
            recorded = done.result or {}
            if "payload" in recorded:
                return recorded["payload"]
            seq, deadline = done.seq, _when(recorded.get("deadline"))
        else:
            deadline = now + timeout if timeout is not None else None
            shown = deadline.isoformat() if deadline else None
            seq = self.settle(
                step_name, occurrence, "wait", status="completed", result={"deadline": shown}
            )
        with ctx._engine.begin() as conn:
            got = signals.take(conn, ctx.run_id, name, now=now)
            if got is not None:
                stored = {"deadline": deadline.isoformat() if deadline else None}
                stored["payload"] = ctx.masker.data(got[0])
                if not steps.set_result(conn, ctx.run_id, ctx.attempt, seq, result=stored):
                    self._lost(step_name)  # leaving the block rolls the consumption back
        if got is not None:
            return got[0]
        if deadline is not None and now >= deadline:
            raise WaitTimeout(f"no signal {name!r} came before {deadline.isoformat()}")
        raise Suspend(deadline or signals.NEVER, signals.PREFIX + name)

    # -- what every kind of checkpointed step goes through ----------------------------------
    def reach(self, name: str) -> tuple[int, steps.Done | None]:
        """Reach the next step named `name`: its occurrence, and what the history recorded
        for it (None: it runs for the first time)."""
        if self.key is not None:
            raise InvalidInput(
                f"{name}: checkpointed steps cannot be nested (inside {self.key!r}); reach it "
                "after the enclosing step, or use `with ctx.step(...)` inside",
                field="step",
            )
        occurrence = self._occurrences[name] = self._occurrences.get(name, 0) + 1
        history = self.history()
        if self._position < len(history.done):
            done = history.done[self._position]
            self._replay(done, name, occurrence)
            return occurrence, done
        return occurrence, None

    def settle(
        self,
        name: str,
        occurrence: int,
        step_type: str,
        *,
        status: str,
        result: Any = None,
        detail: str | None = None,
    ) -> int:
        """Write a step `reach` found new as completed (with `result`) or failed, in one try;
        its seq."""
        ctx = self.ctx
        seq, earlier = self._row_for(self.history(), name, occurrence)
        call = _Call(seq, name, occurrence, step_type, ctx._clock(), earlier, tries=1)
        if not self._write(call, status, result=result, detail=detail):
            self._lost(name)
        return seq

    def _lost(self, step_name: str) -> None:
        ctx = self.ctx
        ctx.stop("lease_lost", "another attempt owns this run now")
        raise LeaseLost(f"run {ctx.run_id} attempt {ctx.attempt}: {step_name} not recorded")

    def _replay(self, done: steps.Done, name: str, occurrence: int) -> Any:
        if (done.name, done.occurrence) != (name, occurrence):
            raise NonDeterministicStep(
                f"step {name!r} (occurrence {occurrence}) was reached where the run's history "
                f"has step {done.name!r} (occurrence {done.occurrence}): an attempt must reach "
                "completed steps in the order they completed",
                expected=done.name,
                reached=name,
            )
        self._position += 1
        return done.result

    def _row_for(
        self, history: steps.History, name: str, occurrence: int
    ) -> tuple[int, steps.Earlier | None]:
        """The step's row: the one an earlier attempt left failed, else a planned one, else
        a new one (its seq taken now, so the run's steps keep the order they were reached)."""
        planned = self.ctx._planned.pop(name, None)
        failed = history.failed.get((name, occurrence))
        if failed is not None:
            return failed.seq, failed
        if planned is not None:
            return planned, steps.Earlier(planned, 0)
        return self.ctx._take_seq(), None

    def _call(
        self,
        call: _Call,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        retries: int,
        base_s: float,
    ) -> Any:
        ctx = self.ctx
        while True:
            call.tries += 1
            try:
                return fn(*args, **kwargs)
            except (RunStopped, LeaseLost, NonDeterministicStep) as exc:
                self._fail(call, exc)
                raise
            except Exception as exc:
                if call.tries > retries or ctx.cancelled:
                    self._fail(call, exc)
                    raise
                delay = min(base_s * 2 ** (call.tries - 1), MAX_BACKOFF_S)
                if ctx.wait(delay):
                    ctx.check_cancel()
            except BaseException as exc:
                self._fail(call, exc)
                raise

    def _complete(self, call: _Call, result: Any) -> Any:
        ctx = self.ctx
        try:
            plain = None if result is None else json.loads(json.dumps(result, allow_nan=False))
        except (TypeError, ValueError) as exc:
            problem = InvalidInput(
                f"step {call.name!r} returned {type(result).__name__}, which is not JSON "
                f"({exc}); return dicts, lists, strings, numbers, booleans or None",
                field="step",
            )
            self._fail(call, problem)
            raise problem from None
        if not self._write(call, "completed", result=ctx.masker.data(plain)):
            self._lost(f"step {call.name!r}")
        return plain

    def _fail(self, call: _Call, exc: BaseException) -> None:
        self._write(call, "failed", detail=self._describe(exc))

    def _write(
        self, call: _Call, status: str, *, result: Any = None, detail: str | None = None
    ) -> bool:
        ctx = self.ctx
        earlier = call.earlier
        outcome = steps.Outcome(
            seq=call.seq,
            name=call.name,
            occurrence=call.occurrence,
            step_type=call.step_type,
            started_at=call.started,
            finished_at=ctx._clock(),
            tries=call.tries + (earlier.tries if earlier else 0),
            status=status,
            result=result,
            detail=detail,
        )
        return ctx._store.record_step(ctx.run_id, ctx.attempt, outcome, reuse=earlier is not None)

    def _describe(self, exc: BaseException) -> str:
        return self.ctx.masker(f"{type(exc).__name__}: {safe_str(exc)}")


@dataclass
class _Call:
    """One attempt's call of a checkpointed step, until its row is written."""

    seq: int
    name: str
    occurrence: int
    step_type: str
    started: datetime
    earlier: steps.Earlier | None
    tries: int = 0


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
