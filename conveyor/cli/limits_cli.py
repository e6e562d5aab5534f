"""`conveyor limits ...`: rate limits shared by all workers, and the concurrency keys in use."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from conveyor.cli.db import cli_engine
from conveyor.cli.output import console, key_values, print_json
from domain.clock import utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.flow import manage
from domain.flow.rates import RateLimit

ACTOR = "cli"

limits_app = typer.Typer(
    help="Rate limits (requests and tokens per minute, shared by all workers) and the "
    "concurrency keys in use.",
    no_args_is_help=True,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Name = Annotated[str, typer.Argument(help="The rate limit's name, as tasks use it.")]


def register(app: typer.Typer) -> None:
    app.add_typer(limits_app, name="limits")


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


@limits_app.command("list")
def list_(json_out: JsonFlag = False) -> None:
    """Each rate limit with what the last minute used, what is left and the runs waiting for
    it; then each concurrency key held or waited for."""
    with cli_engine() as engine:
        shown = manage.overview(UnitOfWork(engine, read_only=True), now=utc_now())
    if json_out:
        print_json(shown)
        return
    table = Table(box=None, pad_edge=False, title="rate limits (last 60 s)", title_justify="left")
    for column in ("NAME", "REQ/MIN", "USED", "LEFT", "TOKENS/MIN", "USED", "LEFT", "WAITING"):
        table.add_column(column)
    for r in shown["rate_limits"]:
        table.add_row(
            r["name"],
            _n(r["requests_per_minute"]),
            _n(r["requests_used"]),
            _n(r["requests_left"]),
            _n(r["tokens_per_minute"]),
            _n(r["tokens_used"]),
            _n(r["tokens_left"]),
            _n(r["waiting"]),
        )
    if shown["rate_limits"]:
        console.print(table)
    else:
        console.print("no rate limits (define one: conveyor limits define NAME --rpm N)")
    if shown["concurrency"]:
        keys = Table(box=None, pad_edge=False, title="concurrency keys", title_justify="left")
        for column in ("KEY", "MAX", "RUNNING", "WAITING"):
            keys.add_column(column)
        for k in shown["concurrency"]:
            keys.add_row(k["key"], str(k["max"]), str(k["running"]), str(k["waiting"]))
        console.print(keys)


@limits_app.command("define")
def define(
    name: Name,
    rpm: Annotated[
        int | None, typer.Option("--rpm", help="Requests per minute, across all workers.")
    ] = None,
    tpm: Annotated[
        int | None, typer.Option("--tpm", help="Tokens per minute, across all workers.")
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Create or change a rate limit (give --rpm, --tpm or both). A limit set here stays as
    set when a worker whose code defines it otherwise starts."""
    limit = RateLimit(name, rpm, tpm)
    with cli_engine() as engine:
        shown = manage.define(
            UnitOfWork(engine), limit, defined_in="cli", actor=ACTOR, now=utc_now()
        )
    if json_out:
        print_json(shown)
    else:
        console.print(key_values(list(shown.items())))


@limits_app.command("remove")
def remove(name: Name) -> None:
    """Delete a rate limit and its counts; runs that name it then start unlimited (with a
    warning) until it is defined again."""
    with cli_engine() as engine:
        manage.remove(UnitOfWork(engine), name, actor=ACTOR)
    console.print(f"removed rate limit {name}")
