"""Long-running processes: `conveyor worker`, `conveyor scheduler`, `conveyor dev`."""

from __future__ import annotations

import os
import signal
from typing import Annotated, Any

import typer

from domain.settings import Settings, get_settings


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(worker)
    app.command()(scheduler)
    app.command()(dev)
    app.command()(workers)


def worker(
    ctx: typer.Context,
    queues: Annotated[
        str | None,
        typer.Option("-Q", "--queues", help="Comma-separated queues (default: default)."),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("-c", "--concurrency", help="Processes or threads.")
    ] = None,
    pool: Annotated[
        str, typer.Option("-P", "--pool", help="prefork (default), threads or solo.")
    ] = "prefork",
    loglevel: Annotated[str, typer.Option("-l", "--loglevel", help="Celery's log level.")] = "INFO",
) -> None:
    """Start a Celery worker that executes runs. Extra options go to `celery worker` as they are."""
    if pool not in {"prefork", "threads", "solo"}:
        from domain.errors import InvalidInput

        raise InvalidInput(
            f"--pool: expected prefork, threads or solo (got {pool!r})", field="pool"
        )
    from domain.db.migrate import wait_for_schema
    from worker.app import create_app

    settings = get_settings()
    wait_for_schema(settings.effective_database_url)  # started beside `conveyor migrate`
    argv = ["worker", "-P", pool, "-l", loglevel, "-E"]
    consumed = worker_queues(settings, queues)
    argv += ["-Q", consumed]
    # Read by each worker process: the registry lists its queues.
    os.environ["CONVEYOR_WORKER_QUEUES"] = consumed
    if concurrency:
        argv += ["-c", str(concurrency)]
    create_app(settings).worker_main([*argv, *ctx.args])


def worker_queues(settings: Settings, requested: str | None) -> str:
    """The queues to consume: those asked for (or the default) plus the submit queue."""
    names = [q.strip() for q in (requested or settings.default_queue).split(",") if q.strip()]
    if settings.submit_queue and settings.submit_queue not in names:
        names.append(settings.submit_queue)
    return ",".join(names)


def scheduler() -> None:
    """Run the scheduler: relay (re-publishes undelivered runs) and reaper (recovers runs whose
    worker died). Start one per deployment or more as standbys: only the leader sweeps."""
    from conveyor import bootstrap
    from domain.db.engine import create_db_engine
    from domain.db.migrate import wait_for_schema
    from domain.tasks.registry import REGISTRY
    from scheduler.service import SchedulerService
    from worker.app import create_app
    from worker.publisher import CeleryPublisher

    settings = get_settings()
    wait_for_schema(settings.effective_database_url)  # started beside `conveyor migrate`
    engine = create_db_engine(settings.effective_database_url, pool_size=4, pre_ping=False)
    # Schedules were checked when they were added: a fire gets the task's defaults from the
    # catalog, and one for a task no worker published yet still fires (checked at its claim).
    # (this imports CONVEYOR_TASK_MODULES)
    catalog = bootstrap.catalog_for(settings, engine, allow_unknown=True)
    service = SchedulerService(
        settings,
        engine,
        CeleryPublisher(create_app(settings)),
        catalog=catalog,
        registry=REGISTRY,
    )
    _stop_on_signals(service.stop)
    try:
        service.run()
    finally:
        engine.dispose()


def dev(
    port: Annotated[
        int, typer.Option(help="Port of the status API on 127.0.0.1; 0: no API.")
    ] = 8000,
    verbose: Annotated[
        bool,
        typer.Option(
            "-v", "--verbose", help="Also show Celery's, APScheduler's and uvicorn's logs."
        ),
    ] = False,
) -> None:
    """Run everything in one process on the embedded default: SQLite under ./.conveyor/, an
    in-memory broker, a thread-pool worker, the scheduler, the API on localhost, and the
    example tasks."""
    from conveyor.dev import run_dev

    run_dev(get_settings(), port=port, verbose=verbose)


def workers(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Worker processes seen recently: alive (heartbeating), stopped, or lost (silent); only
    an alive one shows the runs it is running."""
    from rich.table import Table

    from conveyor.cli.output import ago, console, print_json
    from domain.db.engine import create_db_engine
    from domain.db.unit_of_work import UnitOfWork
    from domain.runs.reads import list_workers

    engine = create_db_engine(get_settings().effective_database_url, pool_size=1)
    try:
        seen = list_workers(UnitOfWork(engine), include_stopped=True)
    finally:
        engine.dispose()
    if json_out:
        print_json([w.to_dict() for w in seen])
        return
    view = Table(box=None, pad_edge=False)
    for column in ("WORKER", "STATE", "QUEUES", "RUNNING", "HEARTBEAT", "STARTED"):
        view.add_column(column)
    for w in seen:
        view.add_row(
            w.id,
            w.state,
            ",".join(w.queues.get("names", [])),
            "-" if w.running is None else str(w.running),
            ago(w.heartbeat_at),
            ago(w.started_at),
        )
    console.print(view)


def _stop_on_signals(stop: Any) -> None:
    def handler(signum: int, _frame: Any) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


__all__ = ["Settings", "register"]
