"""One WorkerRuntime per worker process: engine, log writer, monitor and executor, made on
first use in that process (never at import, never shared across a fork)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable

import structlog
from sqlalchemy import Engine

from domain.clock import utc_now
from domain.costs.prices import Prices
from domain.db.engine import create_db_engine
from domain.flow import rates
from domain.gc_pause import freeze_startup_heap
from domain.pipelines.discovery import PipelineCatalog
from domain.runs.chains import check_chains
from domain.settings import Settings
from domain.tasks import catalog as task_catalog
from domain.tasks.catalog import CompositeCatalog, TaskTableCatalog
from domain.tasks.registry import REGISTRY, Registry, RegistryCatalog, import_task_modules
from worker import capture
from worker.context import TaskContext
from worker.executor import Executor
from worker.lifecycle import Registration
from worker.logwriter import LogWriter
from worker.monitor import RunMonitor
from worker.pipelines import build_pipeline_runner

log = structlog.get_logger("conveyor.worker")


class WorkerRuntime:
    def __init__(self, settings: Settings, registry: Registry = REGISTRY) -> None:
        import_task_modules(settings.task_module_list)
        check_chains(registry)
        self.settings = settings
        self.registry = registry
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        # One connection for the task thread, one for the monitor, one for the writer.
        self.engine: Engine = create_db_engine(
            settings.effective_database_url, pool_size=3, pre_ping=False
        )
        # A start that fails part way (a missing secret key, the database gone) stops what it
        # had started: no LogWriter or registration thread, no pooled connection left behind.
        with contextlib.ExitStack() as started:
            started.callback(self.engine.dispose)
            self.writer = LogWriter(self.engine)
            self.writer.start()
            started.callback(_quietly, self.writer.close)
            capture.install()
            # Syncs the pipelines table and refuses a missing or wrong secret key at start.
            self.pipelines = build_pipeline_runner(settings, self.engine, self.writer)
            # conveyor.submit resolves names as every producer does: this worker's tasks first,
            # then those other workers published (a run for another pool), then pipelines.
            self.catalog = CompositeCatalog(
                RegistryCatalog(registry),
                TaskTableCatalog(self.engine),
                PipelineCatalog(self.pipelines.directory, self.engine),
            )
            #: True in a prefork child: a task that ignores a stop can be ended with its process.
            self.killable = False
            self.monitor = RunMonitor(
                self.engine,
                lease_s=settings.lease_s,
                tick_s=min(settings.heartbeat_s, 1.0),
                kill_grace_s=settings.kill_grace_s,
                on_abandon=self._abandon,
            )
            queues = [q for q in os.environ.get("CONVEYOR_WORKER_QUEUES", "").split(",") if q]
            publish_definitions(self.engine, registry, owner=self.owner)
            self.registration = Registration(
                self.engine,
                self.owner,
                queues,
                running=lambda: self.monitor.running,
                specs=registry.specs(),
            )
            self.registration.start()
            started.callback(self.registration.stop)
            self.executor = Executor(
                self.engine,
                self.writer,
                registry,
                self.monitor,
                owner=self.owner,
                lease_s=settings.lease_s,
                prices=Prices.load(settings.prices_file),
                pipelines=self.pipelines,
            )
            started.pop_all()
        # Celery, kombu, SQLAlchemy, the task modules: a large heap of long-lived objects,
        # walked by every full collection a task's allocations trigger (buffering many log
        # lines or cost entries triggers several).
        freeze_startup_heap()

    def _abandon(self, ctx: TaskContext) -> None:
        self.executor.abandon(ctx)
        if self.killable:
            # The task's code is stuck and its state is recorded: end this child so the code
            # stops too; Celery's pool starts a fresh child in its place.
            log.warning("run.killed", run_id=str(ctx.run_id), reason=ctx.stop_reason)
            self.writer.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            log.warning(
                "run.abandoned",
                run_id=str(ctx.run_id),
                reason=ctx.stop_reason,
                note="thread pool: the task's thread keeps running until it returns",
            )

    def close(self) -> None:
        self.registration.stop()
        self.monitor.close()
        self.executor.close()
        try:
            self.writer.close()  # raises if the last lines cannot be written; still dispose
        finally:
            self.engine.dispose()


def _quietly(stop: Callable[[], None]) -> None:
    """Stop something while a failed start unwinds: the start's own error is the one to show."""
    with contextlib.suppress(Exception):
        stop()


def publish_catalog(settings: Settings, registry: Registry = REGISTRY) -> None:
    """In a worker's main process, before its pool starts: import the task modules and publish
    them, so producers know the tasks before the first run is delivered (whatever the pool)."""
    import_task_modules(settings.task_module_list)
    check_chains(registry)
    engine = create_db_engine(settings.effective_database_url, null_pool=True)
    try:
        owner = f"{socket.gethostname()}:{os.getpid()}"
        publish_definitions(engine, registry, owner=owner)
    except Exception as exc:  # each pool process publishes again when it starts
        log.warning("catalog.publish_failed", reason=str(exc), next="when a pool process starts")
    finally:
        engine.dispose()


def publish_definitions(engine: Engine, registry: Registry, *, owner: str) -> None:
    """What this process's code defines, for everyone: its tasks (the catalog) and its rate
    limits (domain/flow/rates.py)."""
    task_catalog.publish(engine, registry.specs(), owner=owner, now=utc_now())
    with engine.begin() as conn:
        written = rates.sync(conn, now=utc_now())
    if written:
        log.info("rate_limits.defined", owner=owner, names=written)


_lock = threading.Lock()
#: This process's runtimes, one per Settings object (a worker has one; a test process that makes
#: several apps gets one for each, never another app's database), with the pid that made them.
_runtimes: dict[int, tuple[Settings, WorkerRuntime]] = {}
_runtime_pid = 0


def get_runtime(settings: Settings) -> WorkerRuntime:
    """This process's runtime for `settings` (a forked child makes its own)."""
    global _runtime_pid
    with _lock:
        if _runtime_pid != os.getpid():
            _runtimes.clear()  # the parent's: their threads did not survive the fork
            _runtime_pid = os.getpid()
        entry = _runtimes.get(id(settings))
        if entry is None or entry[0] is not settings:
            entry = (settings, WorkerRuntime(settings))
            _runtimes[id(settings)] = entry
        return entry[1]


def close_runtime() -> None:
    """Close this process's runtimes (a forked child's own, never its parent's)."""
    with _lock:
        if _runtime_pid == os.getpid():
            for _, runtime in _runtimes.values():
                runtime.close()
        _runtimes.clear()
