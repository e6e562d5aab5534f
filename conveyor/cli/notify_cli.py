"""`conveyor notify ...`: signed POSTs when runs end in chosen states."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from conveyor.cli.db import cli_uow
from conveyor.cli.output import ago, console, print_json
from domain.settings import get_settings

ACTOR = "cli"

notify_app = typer.Typer(
    help="Notification rules: a signed POST to a URL when a run ends in chosen states.",
    no_args_is_help=True,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def register(app: typer.Typer) -> None:
    app.add_typer(notify_app, name="notify")


@notify_app.command("add")
def add(
    on: Annotated[str, typer.Option("--on", help="States, comma-separated: failed,timed_out,...")],
    url: Annotated[str, typer.Option(help="Where to POST (http or https).")],
    name: Annotated[
        str | None, typer.Option("--name", help="Only runs whose name matches (fnmatch: report*).")
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", help="json (the run summary) or slack ({'text': ...}).")
    ] = "json",
    json_out: JsonFlag = False,
) -> None:
    """Add a rule; it applies to runs that end from now on."""
    from domain.callbacks import rules as notify_rules

    with cli_uow() as uow:
        rule = notify_rules.add_rule(
            uow, on=on, url=url, name_pattern=name, format=format_, actor=ACTOR
        )
    if json_out:
        print_json(rule.to_dict())
        return
    console.print(
        f"rule {rule.id}: runs {'matching ' + name + ' ' if name else ''}ending "
        f"{'/'.join(rule.on_statuses)} → POST {notify_rules.shown_url(rule.url)} ({rule.format})"
    )


@notify_app.command("list")
def list_(json_out: JsonFlag = False) -> None:
    """Every rule, with its whole URL (which may hold a chat hook's credential)."""
    from domain.callbacks import rules as notify_rules

    with cli_uow() as uow:
        items = notify_rules.list_rules(uow)
    if json_out:
        print_json([rule.to_dict() for rule in items])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "ON", "NAME", "FORMAT", "URL", "CREATED"):
        table.add_column(column, overflow="fold" if column == "URL" else "ellipsis")
    for rule in items:
        table.add_row(
            str(rule.id),
            ",".join(rule.on_statuses),
            rule.name_pattern or "*",
            rule.format,
            rule.url,
            ago(rule.created_at),
        )
    console.print(table)


@notify_app.command("rm")
def rm(rule_id: Annotated[int, typer.Argument(help="The rule's id (see notify list).")]) -> None:
    """Remove a rule (deliveries it already queued are still attempted)."""
    from domain.callbacks import rules as notify_rules

    with cli_uow() as uow:
        notify_rules.remove_rule(uow, rule_id, actor=ACTOR)
    console.print(f"rule {rule_id} removed")


@notify_app.command("key")
def key() -> None:
    """Print the key callbacks and notifications are signed with, for receivers.

    It is derived from CONVEYOR_SECRET_KEY (a callback of a webhook's run is signed with that
    webhook's secret instead)."""
    from domain.callbacks.messages import signing_key
    from domain.security.crypto import secret_key_from

    console.print(signing_key(secret_key_from(get_settings())), markup=False, soft_wrap=True)
