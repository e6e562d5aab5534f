"""How the CLI prints: Rich tables for people, JSON for programs, one line for errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from domain.runs.views import RunView

# Off a terminal Rich would wrap at 80 columns; ids and names must stay whole in pipes and logs,
# unless COLUMNS says how wide the reader is.
_width = None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 200
console = Console(highlight=False, width=_width)
err_console = Console(stderr=True, highlight=False)

STATUS_STYLE = {
    "pending": "yellow",
    "waiting": "cyan",
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


# `runs list` columns as printed, and which go first when a terminal is too narrow for all of
# them. The id is never shortened or dropped: it is what `runs show` takes.
RUN_COLUMNS = ("ID", "NAME", "STATUS", "ATTEMPT", "QUEUE", "CREATED", "DURATION")
DROPPED_FIRST = ("QUEUE", "ATTEMPT", "DURATION")
GAP = 2  # Rich's padding between the columns of a box-less table


def runs_table(items: Iterable[RunView], width: int | None = None) -> Table:
    """Runs as a table no wider than `width` (default: the console's). Columns of
    DROPPED_FIRST go, in that order, until the rest fit; a name still too long ends in "…"."""
    rows = [
        {
            "ID": str(run.id),
            "NAME": run.name,
            "STATUS": run.status,
            "ATTEMPT": f"{run.attempt}/{run.max_attempts}",
            "QUEUE": run.queue,
            "CREATED": ago(run.created_at),
            "DURATION": duration(run),
        }
        for run in items
    ]
    widths = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in RUN_COLUMNS}
    limit = console.width if width is None else width
    shown = list(RUN_COLUMNS)
    for column in DROPPED_FIRST:
        if sum(widths[c] + GAP for c in shown) - GAP <= limit:
            break
        shown.remove(column)
    room = max(limit - sum(widths[c] + GAP for c in shown if c != "NAME"), len("NAME"))
    table = Table(box=None, pad_edge=False)
    for column in shown:
        table.add_column(column, no_wrap=True)
    for row in rows:
        row["STATUS"] = status_text(row["STATUS"])
        if len(row["NAME"]) > room:
            row["NAME"] = row["NAME"][: room - 1] + "…"
        table.add_row(*(row[c] for c in shown))
    return table


def key_values(rows: Sequence[tuple[str, Any]]) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(
            key, "-" if value is None else value if isinstance(value, Text) else str(value)
        )
    return table


def as_json(value: Any) -> Text:
    """`value` as the JSON it is stored as (not Python's repr), safe from Rich markup."""
    return Text(json.dumps(value, default=str, ensure_ascii=False))


TRACEBACK_START = "Traceback (most recent call last):"


def split_error(error: str) -> tuple[str, str | None]:
    """A stored error as (its one-line reason, the traceback if one was recorded).

    A worker stores a task's exception as its message, a blank line, then the traceback; an error
    conveyor raised before the task ran (bad params, an unknown task) is the message alone.
    """
    message, start, rest = error.partition(TRACEBACK_START)
    trace = start + rest if start else None
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if not lines and trace:  # an exception without a message: its type is the last line
        lines = [trace.strip().splitlines()[-1]]
    reason = lines[0] if lines else ""
    return (f"{reason} …" if len(lines) > 1 else reason), trace
