"""`conveyor`: the command line. Each command parses input, calls one service, prints."""

from __future__ import annotations

import sys
from importlib.metadata import version
from typing import Annotated

import typer
import typer.main
from sqlalchemy.exc import DBAPIError

from conveyor.cli import (
    api_cli,
    limits_cli,
    notify_cli,
    pipelines_cli,
    processes,
    projects_cli,
    schedules_cli,
)
from conveyor.cli import runs as runs_cli
from conveyor.cli.metavars import name_values
from conveyor.cli.output import console, err_console, fail, print_json
from domain.errors import ConveyorError
from domain.logging import configure_logging
from domain.settings import Settings, get_settings, redact_url

app = typer.Typer(
    name="conveyor",
    help="Durable background work: enqueue runs, run workers, watch what happened.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no boxes, and it reads the same in a pipe or at 80 columns
    add_completion=False,
)
app.add_typer(runs_cli.runs_app, name="runs")
runs_cli.register_top_level(app)
processes.register(app)
schedules_cli.register(app)
projects_cli.register(app)
limits_cli.register(app)
api_cli.register(app)
pipelines_cli.register(app)
notify_cli.register(app)


def settings() -> Settings:
    return get_settings()


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"conveyor {version('conveyor')}")
        raise typer.Exit(0)


@app.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Durable background work: enqueue runs, run workers, watch what happened."""


@app.command()
def migrate(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the database to come up.")
    ] = 30.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create or upgrade conveyor's tables (Alembic), waiting for the database first."""
    from domain.db.migrate import upgrade

    cfg = settings()
    url = cfg.effective_database_url
    upgrade(url, revision=revision, wait_s=wait)
    if json_out:
        print_json({"database": redact_url(url), "revision": revision})
    else:
        console.print(f"database {redact_url(url)} is at revision [bold]{revision}[/]")


def explain_db_error(url: str, exc: DBAPIError) -> str:
    """One line for a database error a command did not expect: what is wrong with the schema
    or the connection if anything is, else the database's own first line."""
    from domain.db.engine import describe_db_error
    from domain.db.migrate import require_schema

    try:
        require_schema(url)
    except ConveyorError as problem:
        return str(problem)
    return describe_db_error(url, exc).replace("cannot reach the database", "the database", 1)


def run_cli(args: list[str] | None = None) -> int:
    """Parse `args` and run the command; a usage mistake is one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    name_values(command)
    try:
        code = command.main(args, prog_name="conveyor", standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors: a bad option, a missing argument
        message = exc.format_message()
        if "\n" in message:  # `conveyor runs` alone: the help text is the answer
            err_console.print(message, markup=False, highlight=False)
        else:
            fail(f"{message}{_help_hint(exc)}", exc.exit_code)
        return exc.exit_code
    except typer.Abort:  # Ctrl-D or Ctrl-C at a prompt
        fail("aborted", 1)
    return code if isinstance(code, int) else 0


def _help_hint(exc: typer.TyperException) -> str:
    ctx = getattr(exc, "ctx", None)
    return f" (see `{ctx.command_path} --help`)" if ctx is not None else ""


def main() -> None:
    """Entry point: a user mistake or an unreachable service is one line on stderr, no trace."""
    try:
        cfg = settings()
        configure_logging(cfg.log_format, cfg.log_level)
        sys.exit(run_cli())
    except ConveyorError as exc:
        fail(str(exc), exc.exit_code)
    except DBAPIError as exc:  # most often: no schema yet (`conveyor migrate`), or a down database
        fail(explain_db_error(get_settings().effective_database_url, exc), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)
