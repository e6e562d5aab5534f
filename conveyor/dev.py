"""`conveyor dev`: every part of conveyor in one process, with no external service."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import warnings
from typing import Any

from celery.exceptions import SecurityWarning

from conveyor import bootstrap
from conveyor.cli.output import console
from domain.clock import utc_now
from domain.db.engine import create_db_engine
from domain.db.migrate import ensure_schema
from domain.errors import ConveyorError, InvalidInput, PortInUse
from domain.logging import quiet_libraries
from domain.pipelines.discovery import pipeline_directory_for
from domain.settings import Settings, redact_url
from domain.tasks import catalog
from domain.tasks.registry import REGISTRY, import_task_modules

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


def require_free_ports(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """Refuse to start when a port dev listens on is taken (most often by another `conveyor
    dev`): said once, before a schema is touched or a thread started. `ports`: what -> port."""
    for what, port in ports.items():
        if port <= 0:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As uvicorn binds: a port only in TIME_WAIT is free, one someone listens on is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OverflowError:
                raise InvalidInput(f"--port: expected 0-65535, got {port}", field="port") from None
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"port {port} on {host} ({what}) is already in use, perhaps by another "
                        f"`conveyor dev`; stop it or pass --port with a free port"
                    ) from None
                raise ConveyorError(
                    f"port {port} on {host} ({what}): cannot listen there ({exc.strerror})"
                ) from None


def _start_api(
    settings: Settings, app: Any, port: int, *, verbose: bool = False
) -> tuple[threading.Thread, Any] | None:
    """The status API in a thread, on loopback only: dev mode serves it without tokens. The
    thread and its uvicorn server (`should_exit` stops it), or None for no API."""
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
            log_level="info" if verbose else "error",
            access_log=verbose,
            log_config=None,  # conveyor's handler renders uvicorn's records too
            proxy_headers=False,  # no proxy in dev: a header must not choose the client address
        )
    )
    thread = threading.Thread(target=server.run, name="conveyor-api", daemon=True)
    thread.start()
    # The banner below promises the URL: wait until it answers, or say why it never will.
    deadline = time.monotonic() + 15
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        require_free_ports({"the status API": port})  # lost a race for the port?
        raise ConveyorError(f"the status API did not start on 127.0.0.1:{port}")
    return thread, server


def banner(url: str, port: int, *, pipelines: list[str]) -> list[str]:
    """The lines `conveyor dev` prints once it is up: where things are and what to type."""
    lines = ["conveyor dev is running (Ctrl-C stops it)"]
    if port:
        base = f"http://127.0.0.1:{port}"
        lines += [
            f"  API      {base}/api/v1/runs  (no token: served to localhost only)",
            f"  docs     {base}/docs",
            f"  dashboard {base}/",
        ]
    lines.append(f"  tasks    {', '.join(REGISTRY.names())}")
    if pipelines:
        lines.append(f"  pipelines {', '.join(pipelines)}")
    lines += [
        f"  database {redact_url(url)}",
        "  try, in another terminal:  conveyor enqueue hello -p name=world --wait",
    ]
    return lines


def run_dev(settings: Settings, *, port: int = 8000, verbose: bool = False) -> None:
    """Migrate, then run scheduler sweeps in a thread and a thread-pool worker in this thread.

    Runs enqueued from another terminal (`conveyor enqueue hello --wait`) land in the database;
    the relay hands them to the in-process broker. Ctrl-C drains running runs and stops;
    pending runs resume on the next start. Celery's banner and the libraries' chatter are
    hidden unless `verbose`.
    """
    from scheduler.service import SchedulerService
    from worker.app import create_app
    from worker.publisher import CeleryPublisher

    require_free_ports({"the status API": port})  # the broker is in-process: it binds nothing
    quiet_libraries(verbose)
    if not verbose:  # dev often runs as root in a container; Celery's advice is for servers
        warnings.filterwarnings("ignore", category=SecurityWarning)
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
        catalog=bootstrap.catalog_for(settings, engine, allow_unknown=True),
        registry=REGISTRY,
    )
    sweeper = threading.Thread(target=service.run, name="conveyor-scheduler", daemon=True)
    sweeper.start()
    pipelines = [
        p for p in pipeline_directory_for(settings).all() if p.runnable and p.config is not None
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
    api = _start_api(settings, app, port, verbose=verbose)
    for line in banner(url, port if api is not None else 0, pipelines=[p.name for p in pipelines]):
        console.print(line, markup=False, highlight=False)
    os.environ["CONVEYOR_WORKER_QUEUES"] = ",".join(queues)
    try:
        app.worker_main(
            [
                *([] if verbose else ["--quiet"]),  # Celery's banner repeats what dev printed
                "worker",
                "-P",
                "threads",
                "-c",
                "4",
                "-l",
                "INFO" if verbose else "WARNING",
                "-E",
                "-Q",
                ",".join(queues),
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ]
        )
    finally:
        # Each thread stopped and joined: a daemon thread still serving or sweeping while the
        # interpreter finalises can crash it (a SIGSEGV at exit, seen once with --verbose).
        if api is not None:
            thread, server = api
            server.should_exit = True
            thread.join(timeout=5)
        service.stop()
        sweeper.join(timeout=5)
        engine.dispose()
