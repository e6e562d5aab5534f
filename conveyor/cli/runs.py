"""Run commands: enqueue, runs list/show, logs, cancel, retry."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from conveyor.cli.output import (
    as_json,
    console,
    duration,
    err_console,
    key_values,
    print_json,
    runs_table,
    split_error,
    status_text,
)
from conveyor.cli.params import AllowUnknown, parse_params, wait_seconds
from domain.errors import InvalidInput, WaitTimeout
from domain.runs.requests import parse_duration
from domain.runs.states import TERMINAL, Status
from domain.runs.views import LogLine, RunView, StepView

if TYPE_CHECKING:
    from conveyor.client import Client

runs_app = typer.Typer(help="List and inspect runs.", no_args_is_help=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
RunId = Annotated[str, typer.Argument(help="The run's id (a UUID).")]
Verbose = Annotated[
    bool, typer.Option("-v", "--verbose", help="Show a failed run's whole error and traceback.")
]


def _client() -> Client:  # imported late: keeps `conveyor --help` free of engine work
    from conveyor.cli.db import client

    return client()


def register_top_level(app: typer.Typer) -> None:
    app.command()(enqueue)
    app.command()(logs)
    app.command()(cancel)
    app.command()(retry)
    runs_app.command("signal")(signal)


def enqueue(
    name: Annotated[str, typer.Argument(help="Task or pipeline to run.")],
    param: Annotated[
        list[str] | None,
        typer.Option("-p", "--param", help="key=value (JSON values keep their type). Repeatable."),
    ] = None,
    params_json: Annotated[str | None, typer.Option(help="All params as a JSON object.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="At most one run per key and project.")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="0 (lowest) to 9 (highest).")] = None,
    delay: Annotated[
        str | None, typer.Option(help="Start no sooner than this: 30s, 5m, 2h.")
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Celery queue (default: the task's).")] = None,
    project: Annotated[str | None, typer.Option(help="Project the run belongs to.")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts before failing.")] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait until the run ends; exit 1 unless it succeeded.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 60.0,
    allow_unknown: AllowUnknown = False,
    verbose: Verbose = False,
    json_out: JsonFlag = False,
) -> None:
    """Create a run of a task or pipeline."""
    params = parse_params(param or [], params_json)
    wait_s = wait_seconds(timeout)
    after = parse_duration(delay, field="delay", bare_seconds=False) if delay else None
    with _client() as c:
        run = c.enqueue(
            name,
            params,
            idempotency_key=idempotency_key,
            priority=priority,
            delay=after,
            queue=queue,
            project=project,
            max_attempts=max_attempts,
            allow_unknown=allow_unknown,
        )
        for warning in c.warnings(run):
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if wait:
            try:
                run = c.wait(run.id, timeout=wait_s)
            except WaitTimeout as exc:
                current = c.get(run.id)
                if current.status == Status.PENDING:
                    raise WaitTimeout(f"{exc}: {c.pending_reason(current)}") from None
                raise
            _show(run, c.logs(run.id), json_out, verbose=verbose)
            raise typer.Exit(0 if run.status == Status.SUCCEEDED else 1)
    if json_out:
        print_json(run.to_dict())
    else:
        console.print(f"{run.id} {status_text(run.status)} {run.name}")


@runs_app.command("list")
def list_runs(
    status: Annotated[
        list[str] | None, typer.Option(help="Only these statuses. Repeatable.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only runs of this task or pipeline.")] = None,
    project: Annotated[str | None, typer.Option(help="Only runs of this project.")] = None,
    limit: Annotated[int, typer.Option(help="How many runs (newest first).")] = 20,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """List runs, newest first."""
    with _client() as c:
        page = c.list(status=status or None, name=name, project=project, limit=limit, cursor=cursor)
    if json_out:
        print_json({"items": [r.to_dict() for r in page.items], "next_cursor": page.next_cursor})
        return
    console.print(runs_table(page.items))
    if page.next_cursor:
        console.print(f"[dim]more: --cursor {page.next_cursor}[/]")


@runs_app.command("show")
def show(run_id: RunId, verbose: Verbose = False, json_out: JsonFlag = False) -> None:
    """Show one run: its state, params, result or error, steps and latest log lines.

    A failure shows its one-line reason; --verbose adds the traceback the worker recorded."""
    from domain.runs.artifacts import listed

    with _client() as c:
        run = c.get(run_id)
        steps = c.steps(run.id)
        lines = c.logs(run.id)
        with c.engine.connect() as conn:
            artifacts = [a.to_dict() for a in listed(conn, run.id)]
    if json_out:
        data = run.to_dict()
        data["steps"] = [
            {**s.to_dict(), "duration_s": s.duration_s, "replayed": s.replayed(run.attempt)}
            for s in steps
        ]
        data["artifacts"] = artifacts
        print_json(data)
        return
    _show(run, lines[-20:], False, verbose=verbose)
    for step in steps:
        console.print(f"  step {step.seq} {_step_line(step, run.attempt)}", markup=False)
    for artifact in artifacts:
        console.print(
            f"  artifact {artifact['name']} ({artifact['size_bytes']} bytes, "
            f"sha256 {str(artifact['sha256'])[:12]}…)"
        )


def _show(run: RunView, lines: list[LogLine], json_out: bool, *, verbose: bool = False) -> None:
    if json_out:
        data = run.to_dict()
        data["logs"] = [line.to_dict() for line in lines]
        print_json(data)
        return
    console.print(
        key_values(
            [
                ("id", run.id),
                ("name", f"{run.name} ({run.kind})"),
                ("status", status_text(run.status)),
                *([("waits for", run.waits_for())] if run.waits_for() else []),
                ("attempt", f"{run.attempt}/{run.max_attempts}"),
                ("queue", f"{run.queue} (priority {run.priority})"),
                ("project", run.project),
                ("params", as_json(run.params)),
                ("created", run.created_at),
                ("duration", duration(run)),
                ("result", None if run.result is None else as_json(run.result)),
                ("error", _error_text(run, verbose)),
                ("parent", run.parent_run_id),
                ("triggered by", run.triggered_by),
            ]
        )
    )
    for line in lines:
        _print_line(line)


def _error_text(run: RunView, verbose: bool) -> Text | None:
    if not run.error:
        return None
    reason, trace = split_error(run.error)
    if verbose:
        return Text(f"{run.error_type}: {run.error}")
    hint = f"\n(traceback: conveyor runs show {run.id} --verbose)" if trace else ""
    return Text(f"{run.error_type}: {reason}{hint}")


def _print_line(line: LogLine) -> None:
    fields = " ".join(f"{k}={v}" for k, v in (line.fields or {}).items())
    console.print(
        f"[dim]{line.ts:%H:%M:%S}[/] {line.stream:<6} {line.message} [dim]{fields}[/]",
        markup=True,
        soft_wrap=True,
    )


def logs(
    run_id: RunId,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing until the run ends.")
    ] = False,
    after_seq: Annotated[int, typer.Option(help="Only lines after this sequence number.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print a run's log lines."""
    import json

    with _client() as c:
        seq = after_seq
        while True:
            batch = c.logs(run_id, after_seq=seq)
            for line in batch:
                if json_out:
                    typer.echo(json.dumps(line.to_dict(), default=str))
                else:
                    _print_line(line)
                seq = line.seq
            if batch or not follow:
                if not follow:
                    return
                continue
            if c.get(run_id).status in TERMINAL:
                if not c.logs(run_id, after_seq=seq):
                    return
                continue
            time.sleep(0.25)


def cancel(run_id: RunId, json_out: JsonFlag = False) -> None:
    """Cancel a run: a pending one ends at once, a running one is asked to stop."""
    with _client() as c:
        run = c.cancel(run_id, actor="cli")
    if json_out:
        print_json(run.to_dict())
    elif run.status == Status.CANCELLED:
        console.print(f"{run.id} {status_text(run.status)}")
    else:
        console.print(f"{run.id} is {status_text(run.status)}; asked it to stop")


def retry(run_id: RunId, json_out: JsonFlag = False) -> None:
    """Start a finished run again as a new run (its parent_run_id points back)."""
    with _client() as c:
        run = c.retry(run_id, actor="cli")
    if json_out:
        print_json(run.to_dict())
    else:
        console.print(f"{run.id} {status_text(run.status)} {run.name} (retry of {run_id})")


def signal(
    run_id: RunId,
    name: Annotated[str, typer.Argument(help="The signal's name (what ctx.wait_for waits on).")],
    payload_json: Annotated[
        str | None, typer.Option("--payload-json", metavar="JSON", help="Any JSON value.")
    ] = None,
    key: Annotated[
        str | None, typer.Option(metavar="KEY", help="Sent once per key: repeats are no-ops.")
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Send a signal to a run: a ctx.wait_for(NAME) there returns its payload."""
    payload: Any = None
    if payload_json is not None:
        try:
            payload = json.loads(payload_json)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"--payload-json: not valid JSON: {exc}", field="payload") from None
    with _client() as c:
        sent = c.signal(run_id, name, payload, key=key, actor="cli")
    if json_out:
        print_json(sent.to_dict())
    elif sent.new:
        console.print(f"signal {name} sent to {run_id}")
    else:
        console.print(f"signal {name} with key {key} was sent to {run_id} already")


def _step_line(step: StepView, run_attempt: int) -> str:
    """`name: status`, and for a checkpointed step its occurrence, tries, cost and whether
    this attempt replayed it (`call #2: completed (2 tries, 0.01 USD, replayed)`)."""
    if step.occurrence is None:
        return f"{step.name}: {step.status}"
    notes = []
    if step.tries > 1:
        notes.append(f"{step.tries} tries")
    if step.cost_usd:
        notes.append(f"{step.cost_usd.normalize():f} USD")
    if step.replayed(run_attempt):
        notes.append("replayed")
    extra = f" ({', '.join(notes)})" if notes else ""
    return f"{step.name} #{step.occurrence}: {step.status}{extra}"
