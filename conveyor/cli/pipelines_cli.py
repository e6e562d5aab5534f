"""`conveyor pipelines list|show|sync|warm` and `conveyor secrets set|list|rm|rotate|encrypt`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.table import Table

from conveyor.cli.output import console, key_values, print_json
from domain.errors import InvalidInput

pipelines_app = typer.Typer(
    help="Directory pipelines: list them, inspect one, sync the table, build environments.",
    no_args_is_help=True,
)
secrets_app = typer.Typer(
    help="Secrets for pipelines, encrypted with CONVEYOR_SECRET_KEY. Values never on argv.",
    no_args_is_help=True,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def register(app: typer.Typer) -> None:
    app.add_typer(pipelines_app, name="pipelines")
    app.add_typer(secrets_app, name="secrets")


@contextmanager
def _tools() -> Iterator[Any]:
    from worker.pipelines.tools import pipeline_tools  # uv and the worker's pipeline code

    with pipeline_tools() as tools:
        yield tools


# -- pipelines ------------------------------------------------------------------------------
@pipelines_app.command("list")
def list_pipelines(
    sync: Annotated[bool, typer.Option(help="Re-read the folders first.")] = True,
    json_out: JsonFlag = False,
) -> None:
    """Every pipeline with its state; a disabled one shows exactly why."""
    with _tools() as tools:
        rows = tools.listing(sync=sync)
    if json_out:
        print_json(rows)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "STATUS", "ENV", "RUNS", "OK", "FAILED", "PROBLEM"):
        table.add_column(column, overflow="fold", no_wrap=column == "NAME")
    for row in rows:
        problem = row["error"] or "; ".join(row["warnings"] or [])
        style = {"enabled": "green", "disabled": "yellow"}.get(row["status"], "red")
        table.add_row(
            row["name"],
            f"[{style}]{row['status']}[/]",
            row["environment"],
            str(row["total_runs"]),
            str(row["successful_runs"]),
            str(row["failed_runs"]),
            problem or "",
        )
    console.print(table)


@pipelines_app.command()
def show(
    name: Annotated[str, typer.Argument(help="The pipeline (its folder name).")],
    json_out: JsonFlag = False,
) -> None:
    """One pipeline: where it is, its pipeline.json, environment, secrets and counters."""
    with _tools() as tools:
        data = tools.describe(name)
    if json_out:
        print_json(data)
        return
    shown = {**data, "secrets": _secret_list(data["secrets"]), "config": None}
    console.print(key_values([(k, v) for k, v in shown.items() if k != "config"]))
    if data["config"] is not None:
        console.print_json(data=data["config"])


@pipelines_app.command("sync")
def sync_pipelines(json_out: JsonFlag = False) -> None:
    """Re-read CONVEYOR_PIPELINES_DIR into the pipelines table (workers also do on start)."""
    with _tools() as tools:
        directory, report, disabled = tools.sync()
    if json_out:
        print_json(report.to_dict())
        return
    console.print(
        f"{directory.root}: {len(report.added)} added, {len(report.updated)} updated, "
        f"{len(report.invalid)} invalid, {len(report.missing)} gone"
    )
    for name in report.invalid:
        console.print(f"  [red]invalid[/] {name}: see `conveyor pipelines show {name}`")
    for name in disabled:
        console.print(f"  schedule {name} disabled: no longer in its pipeline.json")


@pipelines_app.command()
def warm(
    name: Annotated[str | None, typer.Argument(help="Only this pipeline (default: all).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Build environments ahead of the first run; records last_cache_warmup and setup time."""

    def say(message: str, level: str, label: str) -> None:
        if not json_out:
            console.print(f"[dim]{label}:[/] {message}", markup=True)

    with _tools() as tools:
        results = tools.warm(name, say)
    if json_out:
        print_json(results)
    else:
        for r in results:
            state = (
                f"[green]ready[/] ({r['environment']}, {r['setup_s']}s)"
                if r["ok"]
                else f"[red]failed[/]: {r['error']}"
            )
            console.print(f"{r['name']}: {state}")
    if any(not r["ok"] for r in results):
        raise typer.Exit(1)


def _secret_list(secrets: dict[str, bool]) -> str:
    return ", ".join(f"{k}" + ("" if ok else " (not stored!)") for k, ok in secrets.items()) or "-"


# -- secrets --------------------------------------------------------------------------------
@secrets_app.command("set")
def set_secret(
    name: Annotated[str, typer.Argument(help="Becomes the environment variable's name.")],
    parameter: Annotated[
        bool, typer.Option("--parameter", help="A plain setting: injected but not masked.")
    ] = False,
) -> None:
    """Store a secret; the value is read from stdin, or asked for without echo."""
    from domain.security.secrets import check_name

    check_name(name)
    value = _read_value(name)
    with _tools() as tools:
        created = tools.secrets().set(name, value, is_parameter=parameter)
    kind = "parameter" if parameter else "secret"
    console.print(f"{kind} {name} {'stored' if created else 'updated'}")


def _read_value(name: str, *, prompt: str | None = None) -> str:
    if sys.stdin is not None and not sys.stdin.isatty():
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
    else:
        value = typer.prompt(
            prompt or f"value of {name}", hide_input=True, confirmation_prompt=True
        )
    if not value:
        raise InvalidInput("secret value: empty (pipe it on stdin or type it at the prompt)")
    return value


@secrets_app.command("list")
def list_secrets(json_out: JsonFlag = False) -> None:
    """Names only (and whether each is a parameter): values are never shown."""
    with _tools() as tools:
        items = tools.secrets().list_all()
    if json_out:
        print_json([item.to_dict() for item in items])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "KIND", "UPDATED"):
        table.add_column(column)
    for item in items:
        kind = "parameter" if item.is_parameter else "secret"
        table.add_row(item.name, kind, item.updated_at.isoformat(timespec="seconds"))
    console.print(table)


@secrets_app.command("rm")
def remove_secret(name: Annotated[str, typer.Argument(help="The secret to delete.")]) -> None:
    """Delete a secret (pipelines that name it then fail with a clear error)."""
    with _tools() as tools:
        tools.secrets().remove(name)
    console.print(f"secret {name} removed")


@secrets_app.command()
def rotate() -> None:
    """Re-encrypt every secret with the first key of CONVEYOR_SECRET_KEY (new key first, old
    key after it, comma-separated; drop the old one once this has run)."""
    with _tools() as tools:
        count = tools.secrets().rotate()
    console.print(f"{count} secret(s) re-encrypted with the current key")


@secrets_app.command()
def encrypt() -> None:
    """Encrypt a value for pipeline.json's `encrypted_env` with CONVEYOR_SECRET_KEY: the value
    is read from stdin, or asked for without echo; only the token is printed."""
    from domain.security.crypto import encrypt as seal
    from domain.security.crypto import fernet_for, secret_key_from
    from domain.security.masking import MIN_SECRET_CHARS
    from domain.security.secrets import check_value
    from domain.settings import get_settings

    key = secret_key_from(get_settings())
    fernet_for(key)  # no key, or a bad one: say so before asking for the value
    value = _read_value("value", prompt="value to encrypt")
    if len(value) < MIN_SECRET_CHARS:
        raise InvalidInput(
            f"value: at least {MIN_SECRET_CHARS} characters (shorter values cannot be masked "
            "in logs); put plain settings in default_env",
            field="value",
        )
    typer.echo(seal(key, check_value(value, is_parameter=True)))


__all__ = ["pipelines_app", "register", "secrets_app"]
