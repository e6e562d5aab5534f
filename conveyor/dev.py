"""`conveyor dev`: every part of conveyor in one process, with no external service."""

from __future__ import annotations

import os
import threading
from typing import Any

from conveyor.cli.output import console
from domain import catalog
from domain.catalog import permissive, producer_catalog
from domain.clock import utc_now
from domain.db import create_db_engine
from domain.migrate import ensure_schema
from domain.pipelines import PipelineDirectory, pipeline_settings
from domain.registry import REGISTRY, import_task_modules
from domain.settings import Settings, redact_url

DEV_TASK_MODULES = "examples.hello"


def dev_settings(settings: Settings) -> Settings:
    """The in-process broker always; the example tasks unless the user named their own."""
    return settings.model_copy(
        update={
            "broker_url": "memory://",
            "task_modules": settings.task_modules or DEV_TASK_MODULES,
            "relay_interval_s": min(settings.relay_interval_s, 0.2),
        }
    )


def _start_api(settings: Settings, app: Any, port: int) -> threading.Thread | None:
    """The status API in a thread, on loopback only: dev mode serves it without tokens."""
    if port <= 0:
        return None
    import uvicorn

    from api.app import create_api
    from worker.publisher import CeleryPublisher

    server = uvicorn.Server(
        uvicorn.Config(
            create_api(settings, publisher=CeleryPublisher(app), auth_disabled=True),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            proxy_headers=False,  # no proxy in dev: a header must not choose the client address
        )
    )
    thread = threading.Thread(target=server.run, name="conveyor-api", daemon=True)
    thread.start()
    return thread


def run_dev(settings: Settings, *, port: int = 8000) -> None:
    """Migrate, then run scheduler sweeps in a thread and a thread-pool worker in this thread.

    Runs enqueued from another terminal (`conveyor enqueue hello --wait`) land in the database;
    the relay hands them to the in-process broker. Ctrl-C drains running runs and stops;
    pending runs resume on the next start.
    """
    from scheduler.service import SchedulerService
    from worker.app import create_app
    from worker.publisher import CeleryPublisher

    settings = dev_settings(settings)
    url = settings.effective_database_url
    ensure_schema(url)
    import_task_modules(settings.task_module_list)
    app = create_app(settings)
    engine = create_db_engine(url, pool_size=2)
    # Before the banner invites the first `conveyor enqueue` from another terminal.
    catalog.publish(engine, REGISTRY.specs(), owner=f"dev:{os.getpid()}", now=utc_now())
    service = SchedulerService(
        settings,
        engine,
        CeleryPublisher(app),
        catalog=permissive(producer_catalog(settings, engine)),
        registry=REGISTRY,
    )
    sweeper = threading.Thread(target=service.run, name="conveyor-scheduler", daemon=True)
    sweeper.start()
    pipelines = [
        p
        for p in PipelineDirectory(pipeline_settings(settings).pipelines_dir).all()
        if p.runnable and p.config is not None
    ]
    queues = sorted(
        {
            settings.default_queue,
            settings.submit_queue,
            *(REGISTRY.get(n).queue for n in REGISTRY.names()),
            *(p.config.queue for p in pipelines if p.config and p.config.queue),
        }
        - {"", None}
    )
    api = _start_api(settings, app, port)
    console.print(f"conveyor dev: database {redact_url(url)} (schema at head), in-process broker")
    if api is not None:
        console.print(
            f"API on http://127.0.0.1:{port}/docs without tokens (bound to localhost only; "
            "run `conveyor api` with tokens to expose it)"
        )
    console.print(f"tasks: {', '.join(REGISTRY.names())}; queues: {', '.join(queues)}")
    if pipelines:
        console.print(f"pipelines: {', '.join(p.name for p in pipelines)}")
    console.print("try, in another terminal:  conveyor enqueue hello -p name=world --wait")
    os.environ["CONVEYOR_WORKER_QUEUES"] = ",".join(queues)
    try:
        app.worker_main(
            [
                "worker",
                "-P",
                "threads",
                "-c",
                "4",
                "-l",
                "WARNING",
                "-E",
                "-Q",
                ",".join(queues),
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ]
        )
    finally:
        service.stop()
        sweeper.join(timeout=5)
        engine.dispose()
