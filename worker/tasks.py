"""The Celery tasks conveyor registers: thin entry points into the executor and the use cases."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from celery import Celery, Task
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutting_down,
)
from sqlalchemy.exc import DataError, InterfaceError, OperationalError

from domain import storable
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ConveyorError, DatabaseUnavailable, InvalidInput, TransientError
from domain.runs import enqueue
from domain.runs.requests import build_request
from domain.settings import Settings
from domain.tasks.registry import RetryPolicy
from worker.deadletter import dead_letter
from worker.outcomes import backoff_s
from worker.publisher import CeleryPublisher
from worker.routing import EXECUTE, SUBMIT
from worker.runtime import WorkerRuntime, close_runtime, get_runtime, publish_catalog
from worker.task_states import RunFailed, task_result

log = structlog.get_logger("conveyor.worker")

SUBMIT_FIELDS = {
    "name",
    "params",
    "idempotency_key",
    "queue",
    "priority",
    "project",
    "max_attempts",
    "timeout_s",
    "budget_usd",
    "max_requests",
    "max_minutes",
    "delay_s",
    "concurrency_key",
    "concurrency_max",
}
#: Between attempts of a submit, or of a run's claim, while the database cannot be reached
#: (Celery sends the message again).
SUBMIT_BACKOFF = RetryPolicy(base_s=1.0, max_s=30.0)


def _deferred(task: Task, event: str, exc: Exception, **fields: Any) -> Exception:
    """One warning line, and the task's message sent again after a backoff: what a task does
    when the database cannot be reached (Celery's Retry, to raise)."""
    countdown = backoff_s(SUBMIT_BACKOFF, task.request.retries + 1)
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    log.warning(event, reason=reason, retry_in_s=round(countdown, 1), **fields)
    retry: Exception = task.retry(countdown=countdown)
    return retry


def register(app: Celery, settings: Settings) -> None:
    """Attach conveyor's tasks and per-process hooks to `app`."""

    def runtime() -> WorkerRuntime:
        """This process's runtime, publishing (the runs a keyed run hands its slot to) through
        this app's broker connection."""
        current = get_runtime(settings)
        if current.executor.publisher is None:
            current.executor.publisher = CeleryPublisher(app)
        return current

    # shared=False: the tasks belong to this app only (a shared task would be added to every
    # app made later in the process, bound to this one's settings).
    # The task's state is the run's (worker/task_states.py): a run that did not succeed ends
    # the task with RunFailed, an expected outcome Celery logs in one line, no traceback.
    @app.task(
        name=EXECUTE,
        bind=True,
        ignore_result=True,
        max_retries=None,  # sent again only while the database cannot be reached
        shared=False,
        throws=(RunFailed,),
    )
    def execute(self: Task, run_id: Any = None, *args: Any, **kwargs: Any) -> str:
        try:
            rid = uuid.UUID(str(run_id))
            if args or kwargs:
                raise ValueError("conveyor.execute takes exactly one argument, the run id")
        except ValueError as exc:
            reason = f"malformed conveyor.execute message: {exc}"
            dead_letter(get_runtime(settings).engine, EXECUTE, self.request, reason)
            raise RunFailed(reason) from None
        try:
            return task_result(runtime().executor.execute(rid))
        except DatabaseUnavailable as exc:
            # The claim could not reach the database: the same message again after a backoff
            # (the claim runs it at most once, however many copies arrive).
            raise _deferred(self, "run.claim_deferred", exc, run_id=str(rid)) from None

    @app.task(
        name=SUBMIT,
        bind=True,
        ignore_result=True,
        max_retries=None,
        shared=False,
        throws=(RunFailed,),
    )
    def submit(self: Task, *args: Any, **kwargs: Any) -> str:
        """For plain Celery clients: create the run (idempotently) and execute it here.

        While the database cannot be reached Celery sends the submit again after a backoff
        (same id, so its idempotency key names one run, and the claim runs it at most once);
        a submit that is refused is a dead letter with the reason."""
        try:
            current = runtime()
            run_id = _accept(current, self.request, args, kwargs)
            if run_id is None:
                raise RunFailed("conveyor.submit refused: see its dead letter")
            return task_result(current.executor.execute(run_id))
        except (TransientError, OperationalError, InterfaceError) as exc:
            raise _deferred(self, "submit.deferred", exc, message_id=self.request.id) from None

    in_process = {"pool": False}

    def ours(sender: Any) -> bool:
        # Celery's signals are process-wide: a process that made several apps (tests do) must
        # not publish one app's catalog, or start its runtime, for another app's worker.
        return getattr(sender, "app", app) is app

    @worker_init.connect(weak=False)
    def _publish(sender: Any = None, **_: Any) -> None:
        if not ours(sender):
            return
        publish_catalog(settings)
        # A thread (or solo) pool runs tasks in this process: no pool process will start the
        # runtime, so it starts when the worker is ready (heartbeat, catalog refresh).
        in_process["pool"] = "prefork" not in str(getattr(sender, "pool_cls", "prefork"))

    @worker_ready.connect(weak=False)
    def _ready(sender: Any = None, **_: Any) -> None:
        if in_process["pool"] and ours(sender):
            get_runtime(settings)

    @worker_process_init.connect(weak=False)
    def _init(**_: Any) -> None:
        get_runtime(settings).killable = True

    @worker_shutting_down.connect(weak=False)
    def _graceful(how: str = "", **_: Any) -> None:
        if how != "Warm":
            return
        from domain.db.engine import create_db_engine
        from worker.lifecycle import graceful_stop

        log.info("worker.shutting_down", grace_s=settings.shutdown_grace_s)
        engine = create_db_engine(settings.effective_database_url, null_pool=True)
        graceful_stop(engine, settings.shutdown_grace_s)

    @worker_process_shutdown.connect(weak=False)
    def _shutdown(**_: Any) -> None:
        close_runtime()


def _accept(
    runtime: WorkerRuntime, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> uuid.UUID | None:
    """The submit's run (created unless its idempotency key names one already), or None when
    the submit is refused, recorded as a dead letter. TransientError, with nothing written,
    when the database cannot be reached (for the run or for its dead letter)."""
    try:
        return _enqueue(runtime, request, args, kwargs)
    except TransientError:
        raise
    except ConveyorError as exc:
        reason = str(exc)
    except DataError as exc:  # the last line: what the checks did not foresee
        reason = f"the database refused a value: {str(exc.orig).strip().splitlines()[0]}"
    except (ValueError, TypeError, OverflowError) as exc:  # a value no check bounded yet
        reason = f"cannot make a run of this submit: {type(exc).__name__}: {exc}"
    dead_letter(runtime.engine, SUBMIT, request, reason)
    return None


def _enqueue(
    runtime: WorkerRuntime, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> uuid.UUID:
    if args:
        raise InvalidInput("conveyor.submit takes keyword arguments only (kwargs={...})")
    unknown = sorted(set(kwargs) - SUBMIT_FIELDS)
    if unknown:
        raise InvalidInput(
            f"{unknown[0]}: unknown field; conveyor.submit accepts "
            f"{', '.join(sorted(SUBMIT_FIELDS))}",
            field=unknown[0],
        )
    # Before anything is written: text with NUL, integers beyond 64 bits, numbers that are not
    # finite (JSON from Celery may hold all three), named by their path.
    storable.check_fields(kwargs)
    fields = dict(kwargs)
    # A redelivered message must not create a second run.
    fields.setdefault("idempotency_key", f"celery:{request.id}")
    req = build_request(triggered_by="celery", trigger_ref=request.id, **fields)
    return enqueue.enqueue(
        UnitOfWork(runtime.engine), req, catalog=runtime.catalog, inline=True
    ).run.id
