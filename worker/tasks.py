"""The Celery tasks conveyor registers: thin entry points into the executor and services."""

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

from domain import services
from domain.errors import ConveyorError, InvalidInput
from domain.requests import build_request
from domain.settings import Settings
from domain.unit_of_work import UnitOfWork
from worker.app import EXECUTE, SUBMIT
from worker.deadletter import dead_letter
from worker.runtime import close_runtime, get_runtime, publish_catalog

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
}


def register(app: Celery, settings: Settings) -> None:
    """Attach conveyor's tasks and per-process hooks to `app`."""

    @app.task(name=EXECUTE, bind=True, ignore_result=True)
    def execute(self: Task, run_id: Any = None, *args: Any, **kwargs: Any) -> str:
        try:
            rid = uuid.UUID(str(run_id))
            if args or kwargs:
                raise ValueError("conveyor.execute takes exactly one argument, the run id")
        except ValueError as exc:
            reason = f"malformed conveyor.execute message: {exc}"
            dead_letter(get_runtime(settings).engine, EXECUTE, self.request, reason)
            return "rejected"
        return get_runtime(settings).executor.execute(rid).status

    @app.task(name=SUBMIT, bind=True, ignore_result=True)
    def submit(self: Task, *args: Any, **kwargs: Any) -> str:
        """For plain Celery clients: create the run (idempotently) and execute it here."""
        runtime = get_runtime(settings)
        try:
            if args:
                raise InvalidInput("conveyor.submit takes keyword arguments only (kwargs={...})")
            unknown = sorted(set(kwargs) - SUBMIT_FIELDS)
            if unknown:
                raise InvalidInput(
                    f"{unknown[0]}: unknown field; conveyor.submit accepts "
                    f"{', '.join(sorted(SUBMIT_FIELDS))}",
                    field=unknown[0],
                )
            fields = dict(kwargs)
            # A redelivered message must not create a second run.
            fields.setdefault("idempotency_key", f"celery:{self.request.id}")
            request = build_request(triggered_by="celery", trigger_ref=self.request.id, **fields)
            run = services.enqueue(
                UnitOfWork(runtime.engine), request, catalog=runtime.catalog, inline=True
            ).run
        except ConveyorError as exc:
            dead_letter(runtime.engine, SUBMIT, self.request, str(exc))
            return "rejected"
        return runtime.executor.execute(run.id).status

    in_process = {"pool": False}

    @worker_init.connect(weak=False)
    def _publish(sender: Any = None, **_: Any) -> None:
        publish_catalog(settings)
        # A thread (or solo) pool runs tasks in this process: no pool process will start the
        # runtime, so it starts when the worker is ready (heartbeat, catalog refresh).
        in_process["pool"] = "prefork" not in str(getattr(sender, "pool_cls", "prefork"))

    @worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        if in_process["pool"]:
            get_runtime(settings)

    @worker_process_init.connect(weak=False)
    def _init(**_: Any) -> None:
        get_runtime(settings).killable = True

    @worker_shutting_down.connect(weak=False)
    def _graceful(how: str = "", **_: Any) -> None:
        if how != "Warm":
            return
        from domain.db import create_db_engine
        from worker.lifecycle import graceful_stop

        log.info("worker.shutting_down", grace_s=settings.shutdown_grace_s)
        engine = create_db_engine(settings.effective_database_url, null_pool=True)
        graceful_stop(engine, settings.shutdown_grace_s)

    @worker_process_shutdown.connect(weak=False)
    def _shutdown(**_: Any) -> None:
        close_runtime()
