"""`conveyor`: the command line. Each command parses input, calls one service, prints."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy.exc import DBAPIError

from conveyor.cli import api_cli, notify_cli, pipelines_cli, processes, projects_cli, schedules_cli
from conveyor.cli import runs as runs_cli
from conveyor.cli.output import console, fail, print_json
from conveyor.client import Client
from domain.errors import ConveyorError
from domain.logging import configure_logging
from domain.settings import Settings, get_settings, redact_url

app = typer.Typer(
    name="conveyor",
    help="Durable background work: enqueue runs, run workers, watch what happened.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(runs_cli.runs_app, name="runs")
runs_cli.register_top_level(app)
processes.register(app)
schedules_cli.register(app)
projects_cli.register(app)
api_cli.register(app)
pipelines_cli.register(app)
notify_cli.register(app)


def settings() -> Settings:
    return get_settings()


@app.command()
def migrate(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the database to come up.")
    ] = 30.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create or upgrade conveyor's tables (Alembic), waiting for the database first."""
    from domain.migrate import upgrade

    cfg = settings()
    url = cfg.effective_database_url
    upgrade(url, revision=revision, wait_s=wait)
    if json_out:
        print_json({"database": redact_url(url), "revision": revision})
    else:
        console.print(f"database {redact_url(url)} is at revision [bold]{revision}[/]")


def client() -> Client:
    return Client(settings(), triggered_by="cli")


def explain_db_error(url: str, exc: DBAPIError) -> str:
    """One line for a database error a command did not expect: what is wrong with the schema
    or the connection if anything is, else the database's own first line."""
    from domain.db import describe_db_error
    from domain.migrate import require_schema

    try:
        require_schema(url)
    except ConveyorError as problem:
        return str(problem)
    return describe_db_error(url, exc).replace("cannot reach the database", "the database", 1)


def main() -> None:
    """Entry point: a user mistake or an unreachable service is one line on stderr, no trace."""
    try:
        cfg = settings()
        configure_logging(cfg.log_format, cfg.log_level)
        app()
    except ConveyorError as exc:
        fail(str(exc), exc.exit_code)
    except DBAPIError as exc:  # most often: no schema yet (`conveyor migrate`), or a down database
        fail(explain_db_error(get_settings().effective_database_url, exc), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)
