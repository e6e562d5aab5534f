"""conveyor logs through stdlib logging: silent as a library, configured by its own commands.

Every event goes from structlog to a stdlib logger under `conveyor` (`conveyor.runs`,
`conveyor.worker`, ...), which carries a NullHandler: a program that imports conveyor and sets up
no logging sees nothing, and one that does (`logging.basicConfig`) sees conveyor's events as
records of its own. The `conveyor` commands (api, worker, scheduler, dev, the CLI) call
`configure_logging`: JSON lines when not on a terminal, readable when on one, on stderr.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LOGGER = "conveyor"

_configured = False


def _to_stdlib_record(
    _logger: Any, _method: str, event_dict: Any
) -> tuple[tuple[Any], dict[str, Any]]:
    """Without conveyor's own handler: the event and its fields as one message (key=value)."""
    exc_info = event_dict.pop("exc_info", None)
    event = str(event_dict.pop("event", ""))
    fields = " ".join(f"{key}={value}" for key, value in event_dict.items())
    return (f"{event} {fields}".rstrip(),), {
        "exc_info": exc_info,
        "extra": {"conveyor": event_dict},
    }


def use_library_default() -> None:
    """At import: send conveyor's events to stdlib logging, where they stay silent by default.

    A program that configured structlog before importing conveyor keeps its configuration.
    """
    logging.getLogger(LOGGER).addHandler(logging.NullHandler())
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # cheap when the program logs nothing
            structlog.contextvars.merge_contextvars,
            _to_stdlib_record,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # a program may configure structlog after importing us
    )


def configure_logging(fmt: str = "auto", level: str = "INFO", *, force: bool = False) -> None:
    """For conveyor's own processes: render every record (conveyor's and the libraries') on
    stderr, at `level`. `fmt` is auto, json or console."""
    global _configured
    if _configured and not force:
        return
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    _configured = True


# What the libraries under conveyor say while they start and run: Celery's and kombu's notes,
# APScheduler's "Added job", uvicorn's per-request lines. `conveyor dev` hides them.
LIBRARY_LOGGERS = ("celery", "kombu", "amqp", "apscheduler", "uvicorn", "py.warnings")


def quiet_libraries(verbose: bool = False) -> None:
    """Show the libraries' records only from ERROR up, or all of them when `verbose`."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)


use_library_default()
