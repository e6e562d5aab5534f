"""The run executor: claim, run the task, record the outcome. One call per delivered message."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from domain.clock import Clock, utc_now
from domain.costs.admission import Refused
from domain.costs.prices import Prices
from domain.db.models import run_logs
from domain.errors import (
    DatabaseUnavailable,
    InvalidInput,
    LeaseLost,
    NonDeterministicStep,
    RunStopped,
    UnknownTask,
    safe_str,
)
from domain.flow import concurrency, fair
from domain.pipelines import store as pipeline_store
from domain.ports import Dispatch, Publisher, in_flight_limit
from domain.runs import dispatch, lines, signals
from domain.runs import store as runstore
from domain.runs.chains import chain_follow_up, chain_possible
from domain.runs.recovery import publish_turns, send_or_hand_back
from domain.runs.store import Claim, Finished, RunStore, Slot
from domain.storage import run_store
from domain.tasks.catalog import permissive
from domain.tasks.registry import Registry, RegistryCatalog, RetryPolicy
from worker import capture
from worker.context import STOP_ERRORS, TaskContext
from worker.logwriter import LogWriter
from worker.monitor import RunMonitor
from worker.outcomes import Failure, Outcome, backoff_s, describe_failure, json_result
from worker.steps import Suspend

log = structlog.get_logger("conveyor.executor")


class PipelineRunner(Protocol):
    """Runs directory pipelines (worker/pipelines): the executor hands it kind=pipeline runs."""

    def run(self, ctx: TaskContext) -> Any:
        """Run the pipeline of `ctx.name` with `ctx.params`; return its JSON result or raise."""
        ...

    def retry_policy(self, name: str) -> RetryPolicy:
        """Backoff between attempts for this pipeline (pipeline.json retry_strategy)."""
        ...


class Executor:
    """Executes runs in one worker process. Hot path: one claim transaction, the task, one
    finish transaction that also writes the run's remaining buffered log lines."""

    def __init__(
        self,
        engine: Engine,
        writer: LogWriter,
        registry: Registry,
        monitor: RunMonitor,
        *,
        owner: str,
        lease_s: float,
        clock: Clock = utc_now,
        pipelines: PipelineRunner | None = None,
        prices: Prices | None = None,
        store: RunStore | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.registry = registry
        self.monitor = monitor
        self.owner = owner
        self.lease_s = lease_s
        self.clock = clock
        self.pipelines = pipelines
        self.prices = prices
        self.duplicates_dropped = 0
        #: Claims per queue: each frees a place in it, and every few the queue's next turns
        #: go out (domain/flow/fair.py).
        self.claims_by_queue: Counter[str] = Counter()
        #: Claim, and finish with the last lines (domain/storage.py picks it for the database).
        self.store = store if store is not None else run_store(engine)
        #: Sends the runs a finishing keyed run hands its slot to (else the relay does).
        self.publisher = publisher

    def execute(self, run_id: uuid.UUID) -> Outcome:
        try:
            claim = self.store.claim(
                run_id, owner=self.owner, now=self.clock(), lease_s=self.lease_s
            )
        except (OperationalError, InterfaceError) as exc:
            # Nothing started: the message is tried again (worker/tasks.py), and the run is
            # committed, so the relay re-sends it too should this worker go.
            reason = str(exc.orig or exc).strip().splitlines()[0]
            raise DatabaseUnavailable(f"cannot claim run {run_id}: {reason}") from None
        if isinstance(claim, Refused):
            return self._refused(claim)
        first_seq = 1  # a later attempt's lines follow the earlier attempts' lines
        if claim is not None and claim.attempt > 1:
            with self.engine.connect() as conn:
                first_seq = lines.next_seq(conn, run_logs, run_id)
        if claim is None:
            self.duplicates_dropped += 1
            log.info("run.duplicate_dropped", run_id=str(run_id), owner=self.owner)
            return Outcome(run_id, "dropped")
        self.writer.begin_run(run_id, claim.attempt, first_seq)
        log.debug("run.claimed", run_id=str(run_id), name=claim.name, attempt=claim.attempt)
        self._next_turns(claim.queue)
        try:
            return self._run(claim)
        finally:
            self.writer.end_run(run_id)

    def _refused(self, refused: Refused) -> Outcome:
        """The claim found the run over a limit and ended or held it without starting it, or
        made it wait (for a concurrency slot)."""
        wait_s = None
        if refused.recheck_at is not None:
            wait_s = max(0.0, (refused.recheck_at - utc_now()).total_seconds())
        if refused.turn_queue is not None:
            self._next_turns(refused.turn_queue)
        if refused.woken and self.publisher is not None:
            self._send_woken(list(refused.woken))
        if refused.waits is not None:
            log.info("run.waiting", run_id=str(refused.run_id), reason=refused.waits)
            return Outcome(refused.run_id, "waiting", error_type=refused.waits, retry_in_s=wait_s)
        if refused.held:
            log.info("run.held", run_id=str(refused.run_id), reason=refused.reason)
            return Outcome(
                refused.run_id,
                "held",
                error_type="MonthlyLimitReached",  # as the held run's row says
                error=refused.reason,
                retry_in_s=wait_s,
            )
        log.info("run.refused", run_id=str(refused.run_id), reason=refused.reason)
        return Outcome(
            refused.run_id, "budget_exceeded", error_type="BudgetExceeded", error=refused.reason
        )

    def close(self) -> None:
        self.store.close()

    def _target(self, claim: Claim) -> tuple[Callable[[TaskContext], Any], RetryPolicy]:
        """What to call for this run: a registered task, or the pipeline runner."""
        if claim.kind == "pipeline":
            if self.pipelines is None:
                raise UnknownTask(f"pipeline {claim.name!r}: this worker runs no pipelines")
            return self.pipelines.run, self.pipelines.retry_policy(claim.name)
        spec = self.registry.get(claim.name)
        kwargs = spec.call_kwargs(claim.params)
        return (lambda ctx: spec.fn(ctx, **kwargs)), spec.retry

    def _run(self, claim: Claim) -> Outcome:
        try:
            call, retry_policy = self._target(claim)
        except (UnknownTask, InvalidInput) as exc:
            # Not retryable: the next attempt would meet the same code and the same params.
            return self._finish(claim, "failed", failure=Failure(type(exc).__name__, str(exc)))

        ctx = TaskContext(
            claim,
            engine=self.engine,
            sink=self.writer,
            clock=self.clock,
            prices=self.prices,
            catalog=permissive(RegistryCatalog(self.registry)),
            store=self.store,
        )
        self.monitor.watch(ctx, timeout_s=claim.timeout_s, max_minutes=claim.max_minutes)
        capture.bind(self.writer, claim.run_id, claim.attempt)
        result: Any = None
        error: BaseException | None = None
        pause: Suspend | None = None
        try:
            result = call(ctx)
        except Suspend as suspended:
            pause = suspended
        except Exception as exc:
            error = exc
        finally:
            capture.unbind()
            self.monitor.unwatch(claim.run_id)

        # A pipeline's process exit code (the runner sets it on the context; tasks have none).
        exit_code: int | None = getattr(ctx, "exit_code", None)
        mask = ctx.masker  # a pipeline's secrets: its result and errors can carry them too
        if ctx.stop_reason == "lease_lost":
            log.warning("run.lease_lost", run_id=str(claim.run_id), attempt=claim.attempt)
            self._write_lines(claim.run_id)
            return Outcome(claim.run_id, "lease_lost", claim.attempt)
        if ctx.stop_reason is not None:
            return self._finish_stopped(claim, ctx.stop_reason, mask(ctx.stop_detail), exit_code)
        if pause is not None:
            return self._suspend(claim, pause)
        if isinstance(error, RunStopped):
            reason = next(r for r, cls in STOP_ERRORS.items() if isinstance(error, cls))
            return self._finish_stopped(claim, reason, mask(safe_str(error)), exit_code)
        if error is not None:
            failure = describe_failure(error, mask)
            # Not retryable: the next attempt would reach the same steps in the same order.
            if claim.attempt < claim.max_attempts and not isinstance(error, NonDeterministicStep):
                return self._retry(claim, retry_policy, failure)
            return self._finish(claim, "failed", failure=failure, exit_code=exit_code)
        try:
            stored = mask.data(json_result(result))
        except TypeError as exc:
            return self._finish(
                claim,
                "failed",
                failure=Failure("ResultNotSerializable", str(exc)),
                exit_code=exit_code,
            )
        return self._finish(claim, "succeeded", result=stored, exit_code=exit_code)

    def abandon(self, ctx: TaskContext) -> None:
        """The monitor gave up waiting for a task to stop: record the stop reason now."""
        reason = ctx.stop_reason if ctx.stop_reason in STOP_ERRORS else "cancelled"
        detail = ctx.masker(f"{ctx.stop_detail} (the task did not stop within the grace period)")
        self._finish_stopped(ctx._claim, reason, detail, getattr(ctx, "exit_code", None))

    # -- recording ---------------------------------------------------------------------------
    def _finish_stopped(
        self, claim: Claim, reason: str, detail: str, exit_code: int | None = None
    ) -> Outcome:
        failure = Failure(STOP_ERRORS[reason].__name__, detail or STOP_ERRORS[reason]().message)
        return self._finish(claim, reason, failure=failure, exit_code=exit_code)

    def _commit_final(
        self,
        claim: Claim,
        write: Callable[[Connection], None],
        fast: Callable[[list[dict[str, Any]], Slot | None, datetime], Finished] | None = None,
    ) -> str | None:
        """Write the attempt's last lines and its final state in one transaction.

        `fast`, when given, does the same through the run store (`RunStore.finish`) and says
        whether the fence held; it is used when there is nothing but log lines to write with
        the state.
        A database hiccup is retried with backoff for up to the lease; if it stays down the
        transaction never committed (no half-written run), the lease expires, and the reaper
        gives the run to another attempt. Returns None on success, else why it did not commit.
        """
        logs, metrics = self.writer.take_run(claim.run_id)
        if metrics or len(logs) > self.store.max_inline_lines:
            fast = None
        delay, deadline = 0.1, time.monotonic() + self.lease_s
        while True:
            try:
                if fast is not None:
                    handed_at = self.clock()
                    finished = fast(logs, self._slot(claim), handed_at)
                    self._publish(list(finished.woken), handed_at)
                    if not finished.owned:  # the lines are written all the same
                        raise LeaseLost(f"run {claim.run_id} attempt {claim.attempt}")
                    return None
                with self.engine.begin() as conn:
                    LogWriter.write_rows(conn, logs, metrics)
                    write(conn)
                    handed_at = self.clock()
                    woken = self._hand_on_slot(conn, claim, handed_at)
                self._publish(woken, handed_at)
                return None
            except LeaseLost:
                if fast is None:
                    self._write_rows(logs, metrics)
                log.warning("run.lease_lost", run_id=str(claim.run_id), attempt=claim.attempt)
                return "lease_lost"
            except OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    log.error(
                        "run.finish_failed",
                        run_id=str(claim.run_id),
                        attempt=claim.attempt,
                        reason=str(exc.orig),
                        lines_lost=len(logs),
                        next="the lease expires and the reaper re-queues the run",
                    )
                    return "finish_failed"
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _send_woken(self, woken: list[Dispatch]) -> None:
        """Publish the runs a refused claim made due (marked first, so the relay leaves them)."""
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                dispatch.mark_dispatched(conn, [d.run_id for d in woken], now=now)
        except SQLAlchemyError as exc:
            log.warning("run.wake_failed", count=len(woken), reason=str(exc), next="the relay")
            return
        self._publish(woken, now)

    def _next_turns(self, queue: str) -> None:
        """A run of `queue` was claimed (or parked at its claim): a place in the queue is free.
        Every `fair.top_up_at(limit)`-th such claim publishes the queue's next turns, if runs
        wait for one (domain/flow/fair.py), so one top-up serves several claims; should this
        fail, the relay's sweep gives them."""
        limit = in_flight_limit(self.publisher) if self.publisher is not None else 0
        if not limit or self.publisher is None:
            return
        self.claims_by_queue[queue] += 1
        if self.claims_by_queue[queue] % fair.top_up_at(limit):
            return
        try:
            publish_turns(
                self.engine, self.publisher, limit=limit, now=self.clock(), queues=[queue]
            )
        except Exception as exc:
            log.warning("run.turns_failed", queue=queue, reason=safe_str(exc), next="the relay")

    def _slot(self, claim: Claim) -> Slot | None:
        """The key's slot this attempt holds, to hand on as it finishes (None: no key)."""
        if claim.concurrency_key is None:
            return None
        return Slot(claim.concurrency_key, claim.concurrency_max or 1, self.publisher is not None)

    def _hand_on_slot(self, conn: Connection, claim: Claim, now: datetime) -> list[Dispatch]:
        """This attempt stops holding its key's slot (in its final transaction): the oldest
        waiters of the key are due now, to be published once it commits."""
        if claim.concurrency_key is None:
            return []
        most = claim.concurrency_max or 1
        publishing = self.publisher is not None
        return concurrency.refill(conn, claim.concurrency_key, most, now=now, publishing=publishing)

    def _publish(self, woken: list[Dispatch], marked_at: datetime) -> None:
        if woken and self.publisher is not None:
            publisher = self.publisher
            ids = [d.run_id for d in woken]
            send_or_hand_back(
                lambda: publisher.publish(woken), self.engine, ids, marked_at=marked_at
            )

    def _finish(
        self,
        claim: Claim,
        status: str,
        *,
        result: Any = None,
        failure: Failure | None = None,
        exit_code: int | None = None,
    ) -> Outcome:
        error_type, error = (failure.error_type, failure.error) if failure else (None, None)

        def write(conn: Connection) -> None:
            now = self.clock()
            runstore.finish(
                conn,
                claim.run_id,
                claim.attempt,
                status=status,
                now=now,
                result=result,
                error_type=error_type,
                error=error,
                exit_code=exit_code,
            )
            if claim.kind == "pipeline":  # counters move with the outcome, exactly
                pipeline_store.record_outcome(conn, claim.name, status, claim.triggered_by)
            # The follow-up (on_success/on_failure) commits with the outcome, or not at all.
            chain_follow_up(
                conn,
                self.registry,
                parent=claim,
                status=status,
                result=result,
                error_type=error_type,
                error=error,
                now=now,
            )

        def fast(lines: list[dict[str, Any]], slot: Slot | None, now: datetime) -> Finished:
            return self.store.finish(
                claim.run_id,
                claim.attempt,
                status=status,
                now=now,
                slot=slot,
                result=result,
                error_type=error_type,
                error=error,
                exit_code=exit_code,
                lines=lines,
            )

        # Pipelines move their counters with the outcome, chains insert a follow-up: both need
        # the general transaction; a plain task's state and last lines go to the run store.
        plain = claim.kind == "task" and not chain_possible(self.registry, claim)
        problem = self._commit_final(claim, write, fast if plain else None)
        if problem is not None:
            return Outcome(claim.run_id, problem, claim.attempt)
        log.info(
            "run.finished",
            run_id=str(claim.run_id),
            name=claim.name,
            status=status,
            attempt=claim.attempt,
            error_type=error_type,
        )
        return Outcome(claim.run_id, status, claim.attempt, error_type, error)

    def _suspend(self, claim: Claim, pause: Suspend) -> Outcome:
        """The task paused (ctx.sleep): the run waits, holding no worker, until it is due."""

        def write(conn: Connection) -> None:
            runstore.suspend(
                conn, claim.run_id, claim.attempt, until=pause.until, reason=pause.reason
            )
            signals.wake_if_sent(conn, claim.run_id, pause.reason, now=self.clock())

        problem = self._commit_final(claim, write)
        if problem is not None:
            return Outcome(claim.run_id, problem, claim.attempt)
        wait_s = max(0.0, (pause.until - self.clock()).total_seconds())
        log.info("run.waiting", run_id=str(claim.run_id), reason=pause.reason, wake_in_s=wait_s)
        return Outcome(claim.run_id, "waiting", claim.attempt, pause.reason, retry_in_s=wait_s)

    def _retry(self, claim: Claim, policy: RetryPolicy, failure: Failure) -> Outcome:
        delay = backoff_s(policy, claim.attempt)

        def write(conn: Connection) -> None:
            now = self.clock()
            runstore.retry_later(
                conn,
                claim.run_id,
                claim.attempt,
                now=now,
                not_before=now + timedelta(seconds=delay),
                error_type=failure.error_type,
                error=failure.error,
            )

        problem = self._commit_final(claim, write)
        if problem is not None:
            return Outcome(claim.run_id, problem, claim.attempt)
        log.info(
            "run.retry_scheduled",
            run_id=str(claim.run_id),
            attempt=claim.attempt,
            delay_s=round(delay, 3),
            error_type=failure.error_type,
        )
        return Outcome(
            claim.run_id, "retrying", claim.attempt, failure.error_type, failure.error, delay
        )

    def _write_lines(self, run_id: uuid.UUID) -> None:
        self._write_rows(*self.writer.take_run(run_id))

    def _write_rows(self, logs: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> None:
        if logs or metrics:
            with self.engine.begin() as conn:
                LogWriter.write_rows(conn, logs, metrics)
