"""How the CLI prints: Rich tables for people, JSON for programs, one line for errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from domain.views import RunView

# Off a terminal Rich would wrap at 80 columns; ids and names must stay whole in pipes and logs.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)

STATUS_STYLE = {
    "pending": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "timed_out": "red",
    "budget_exceeded": "red",
}


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def fail(message: str, code: int = 1) -> None:
    """One readable line on stderr, then exit with `code` (2: the caller's mistake)."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    raise SystemExit(code)


def ago(ts: datetime | None) -> str:
    if ts is None:
        return "-"
    seconds = (datetime.now(UTC) - ts).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def duration(run: RunView) -> str:
    d = run.duration_s
    return "-" if d is None else f"{d:.2f}s"


def status_text(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def runs_table(items: Iterable[RunView]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "NAME", "STATUS", "ATTEMPT", "QUEUE", "CREATED", "DURATION"):
        table.add_column(column, no_wrap=column == "ID")
    for run in items:
        table.add_row(
            str(run.id),
            run.name,
            status_text(run.status),
            f"{run.attempt}/{run.max_attempts}",
            run.queue,
            ago(run.created_at),
            duration(run),
        )
    return table


def key_values(rows: Sequence[tuple[str, Any]]) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    return table
