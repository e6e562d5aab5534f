"""`conveyor api`, `conveyor tokens ...` and `conveyor webhooks ...`."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer
from rich.table import Table

from conveyor.cli.db import cli_uow
from conveyor.cli.output import ago, console, print_json
from conveyor.cli.params import AllowUnknown
from domain.settings import get_settings

ACTOR = "cli"

tokens_app = typer.Typer(
    help="API tokens: create (shown once), list, revoke.", no_args_is_help=True
)
webhooks_app = typer.Typer(help="Signed webhook endpoints: POST /hooks/NAME.", no_args_is_help=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def register(app: typer.Typer) -> None:
    app.command("api")(api)
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(webhooks_app, name="webhooks")


def api(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Dev only: no tokens; loopback addresses only.")
    ] = False,
) -> None:
    """Serve the status API, webhooks and /metrics (OpenAPI at /docs)."""
    import uvicorn

    from api.app import create_api
    from domain.db.migrate import wait_for_schema
    from domain.errors import InvalidInput

    if no_auth and not _is_loopback(host):
        raise InvalidInput(
            f"--no-auth: only allowed when bound to localhost (got --host {host})", field="host"
        )
    settings = get_settings()
    if no_auth:
        console.print("[yellow]authentication is disabled: only local clients are served[/]")
    wait_for_schema(settings.effective_database_url)  # started beside `conveyor migrate`
    proxies = settings.trusted_proxy_list
    uvicorn.run(
        create_api(settings, auth_disabled=no_auth),
        host=host,
        port=port,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise: any local
        # process could then choose the address the failed-auth brake and the audit log see.
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies,
        log_config=None,  # keep conveyor's structlog setup
        access_log=False,  # conveyor_http_requests_total counts requests
        timeout_graceful_shutdown=5,  # live-log streams would hold shutdown open
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="Who or what uses it (the audit log's actor).")],
    role: Annotated[str, typer.Option(help="readonly, write or admin.")] = "readonly",
    json_out: JsonFlag = False,
) -> None:
    """Create a token and print it once: conveyor stores only its hash."""
    from domain.security import tokens as auth

    with cli_uow() as uow:
        view, token = auth.create_token(uow, name, role, actor=ACTOR)
    if json_out:
        print_json({**view.to_dict(), "token": token})
        return
    console.print(f"token [bold]{view.name}[/] ({view.role}) created; it is shown only now:")
    console.print(token, markup=False, soft_wrap=True)


@tokens_app.command("list")
def tokens_list(json_out: JsonFlag = False) -> None:
    """List tokens (never their values)."""
    from domain.security import tokens as auth

    with cli_uow() as uow:
        items = auth.list_tokens(uow)
    if json_out:
        print_json([t.to_dict() for t in items])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "ROLE", "CREATED", "LAST USED", "REVOKED"):
        table.add_column(column)
    for t in items:
        table.add_row(t.name, t.role, ago(t.created_at), ago(t.last_used_at), ago(t.revoked_at))
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(name: Annotated[str, typer.Argument(help="The token's name.")]) -> None:
    """Revoke a token at once."""
    from domain.security import tokens as auth

    with cli_uow() as uow:
        auth.revoke_token(uow, name, actor=ACTOR)
    console.print(f"token {name} revoked")


@webhooks_app.command("add")
def webhooks_add(
    name: Annotated[str, typer.Argument(help="Endpoint name: POST /hooks/NAME.")],
    target: Annotated[str, typer.Option(help="Task or pipeline each delivery runs.")],
    kind: Annotated[str, typer.Option(help="task or pipeline.")] = "task",
    project: Annotated[str | None, typer.Option(help="Project of the runs.")] = None,
    allow_unknown: AllowUnknown = False,
    json_out: JsonFlag = False,
) -> None:
    """Create a webhook endpoint and print its signing secret once (stored encrypted)."""
    from conveyor import bootstrap
    from domain.security.crypto import secret_key_from
    from domain.webhooks import inbound as webhooks

    settings = get_settings()
    with cli_uow() as uow:
        catalog = None if allow_unknown else bootstrap.catalog_for(settings, uow.engine)
        view, secret = webhooks.add_webhook(
            uow,
            name,
            target=target,
            kind=kind,
            project=project or settings.default_project,
            secret_key=secret_key_from(settings),
            actor=ACTOR,
            catalog=catalog,
        )
    if json_out:
        print_json({**view.to_dict(), "secret": secret})
        return
    console.print(f"webhook [bold]{view.name}[/] → {view.target_kind} {view.target_name}")
    console.print(f"POST {view.to_dict()['path']}; signing secret (shown only now):")
    console.print(secret, markup=False, soft_wrap=True)


@webhooks_app.command("list")
def webhooks_list(json_out: JsonFlag = False) -> None:
    """List webhook endpoints (never their secrets)."""
    from domain.webhooks import inbound as webhooks

    with cli_uow() as uow:
        items = webhooks.list_webhooks(uow)
    if json_out:
        print_json([w.to_dict() for w in items])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "TARGET", "PROJECT", "PATH", "CREATED"):
        table.add_column(column)
    for w in items:
        table.add_row(
            w.name,
            f"{w.target_kind} {w.target_name}",
            w.project,
            f"/hooks/{w.name}",
            ago(w.created_at),
        )
    console.print(table)


@webhooks_app.command("rm")
def webhooks_rm(name: Annotated[str, typer.Argument(help="The endpoint's name.")]) -> None:
    """Remove an endpoint (the runs it created stay)."""
    from domain.webhooks import inbound as webhooks

    with cli_uow() as uow:
        webhooks.remove_webhook(uow, name, actor=ACTOR)
    console.print(f"webhook {name} removed")
