"""`conveyor projects ...` and `conveyor costs`: projects, their limits, and what was spent."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from conveyor.cli.db import cli_engine
from conveyor.cli.output import console, key_values, print_json
from domain.clock import utc_now
from domain.costs import ledger as costs
from domain.costs import projects
from domain.costs import reports as cost_reports
from domain.db.unit_of_work import UnitOfWork

projects_app = typer.Typer(help="Projects and their monthly limits.", no_args_is_help=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Name = Annotated[str, typer.Argument(help="The project's name.")]
CostLimit = Annotated[str | None, typer.Option(help="USD per calendar month (UTC); 'none' clears.")]
TokenLimit = Annotated[str | None, typer.Option(help="Tokens per calendar month; 'none' clears.")]
OnLimit = Annotated[
    str | None,
    typer.Option(
        "--on-limit",
        help="At a limit, a run about to start: 'stop' ends it budget_exceeded (default), "
        "'hold' keeps it queued until the limit is raised or the month ends.",
    ),
]


Weight = Annotated[
    int | None,
    typer.Option(
        "--weight",
        help="Its share of a busy queue's starts against other projects' (1-1000, default 1).",
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(projects_app, name="projects")
    app.command(name="costs")(costs_report)


def _limit(value: str | None, *, tokens: bool) -> Any:
    if value is None:
        return projects.UNSET
    if value.strip().lower() == "none":
        return None
    if tokens:
        from domain.errors import InvalidInput

        try:
            return int(value)
        except ValueError:
            raise InvalidInput(
                f"--monthly-tokens: {value!r} is not a whole number", field="monthly_tokens"
            ) from None
    return value


def _show(project: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(project)
    else:
        console.print(key_values(list(project.items())))


@projects_app.command("add")
def add(
    name: Name,
    monthly_cost_usd: CostLimit = None,
    monthly_tokens: TokenLimit = None,
    on_limit: OnLimit = None,
    weight: Weight = None,
    json_out: JsonFlag = False,
) -> None:
    """Create a project (optionally with monthly limits and a weight)."""
    cost, tokens = _limit(monthly_cost_usd, tokens=False), _limit(monthly_tokens, tokens=True)
    with cli_engine() as engine:
        project = projects.add_project(
            UnitOfWork(engine),
            name,
            now=utc_now(),
            monthly_cost_usd=None if cost is projects.UNSET else cost,
            monthly_tokens=None if tokens is projects.UNSET else tokens,
            on_limit=on_limit or "stop",
            weight=1 if weight is None else weight,
        )
    _show(project, json_out)


@projects_app.command("set-limits")
def set_limits(
    name: Name,
    monthly_cost_usd: CostLimit = None,
    monthly_tokens: TokenLimit = None,
    on_limit: OnLimit = None,
    weight: Weight = None,
    json_out: JsonFlag = False,
) -> None:
    """Change a project's monthly limits, or what runs do at one (once one is reached new
    runs are refused and queued runs do not start), or its weight in a busy queue."""
    with cli_engine() as engine:
        project = projects.set_limits(
            UnitOfWork(engine),
            name,
            now=utc_now(),
            monthly_cost_usd=_limit(monthly_cost_usd, tokens=False),
            monthly_tokens=_limit(monthly_tokens, tokens=True),
            on_limit=projects.UNSET if on_limit is None else on_limit,
            weight=projects.UNSET if weight is None else weight,
        )
    _show(project, json_out)


@projects_app.command("list")
def list_(json_out: JsonFlag = False) -> None:
    """Projects with this month's spend against their limits."""
    with cli_engine() as engine:
        rows = projects.list_projects(UnitOfWork(engine), now=utc_now())
    if json_out:
        print_json(rows)
        return
    table = Table(box=None, pad_edge=False)
    for column in (
        "PROJECT", "MONTH", "SPENT USD", "COST LIMIT", "TOKENS", "TOKEN LIMIT", "ON LIMIT",
        "WEIGHT",
    ):  # fmt: skip
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["name"],
            r["month"],
            r["spent_usd"],
            r["monthly_cost_limit_usd"] or "-",
            str(r["tokens"]),
            str(r["monthly_token_limit"] or "-"),
            r["on_limit"],
            str(r["weight"]),
        )
    console.print(table)


@projects_app.command("show")
def show(name: Name, json_out: JsonFlag = False) -> None:
    """One project: limits, spend and reservations this month."""
    with cli_engine() as engine:
        project = projects.show_project(UnitOfWork(engine), name, now=utc_now())
    _show(project, json_out)


def costs_report(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Only entries from this time (ISO).")
    ] = None,
    by: Annotated[
        str, typer.Option(help="Group by provider, model, name, day or project.")
    ] = "model",
    json_out: JsonFlag = False,
) -> None:
    """What was spent, grouped, summed exactly from the cost ledger."""
    from datetime import UTC

    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    with cli_engine() as engine:
        rows = cost_reports.report(UnitOfWork(engine), project=project, since=since, by=by)
    total = sum((r["cost_usd"] for r in rows), costs.ZERO)
    if json_out:
        print_json(
            {
                "groups": [{**r, "cost_usd": str(r["cost_usd"])} for r in rows],
                "total_usd": str(total),
            }
        )
        return
    table = Table(box=None, pad_edge=False)
    for column in (by.upper(), "USD", "TOKENS IN", "TOKENS OUT", "REQUESTS"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            str(r[by]),
            str(r["cost_usd"]),
            str(r["tokens_in"]),
            str(r["tokens_out"]),
            str(r["requests"]),
        )
    table.add_row("[bold]total[/]", f"[bold]{total}[/]", "", "", "")
    console.print(table)
