"""`conveyor schedules ...`: cron, interval and one-off schedules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from conveyor.cli.db import cli_engine
from conveyor.cli.output import console, key_values, print_json
from conveyor.cli.params import AllowUnknown, parse_params
from domain.clock import utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput
from domain.runs.requests import parse_duration
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.settings import get_settings

if TYPE_CHECKING:
    from scheduler.triggers import Slots

schedules_app = typer.Typer(help="Cron, interval and one-off schedules.", no_args_is_help=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Name = Annotated[str, typer.Argument(help="The schedule's name.")]


def register(app: typer.Typer) -> None:
    app.add_typer(schedules_app, name="schedules")


def _trigger(cron: str | None, every: str | None, at: str | None) -> tuple[str, str]:
    given = [(k, v) for k, v in (("cron", cron), ("interval", every), ("once", at)) if v]
    if len(given) != 1:
        raise InvalidInput("give exactly one of --cron, --every or --at", field="trigger")
    if every:  # a person's interval carries its unit: --every 10 is 10 what?
        parse_duration(every, field="every", bare_seconds=False)
    return given[0]


def _slots(
    kind: str, expression: str, tz: str, start: datetime | None = None, end: datetime | None = None
) -> Slots:
    from scheduler.triggers import Slots, TriggerSpec

    return Slots(TriggerSpec(kind, expression, tz, start, end))


@schedules_app.command("add")
def add(
    name: Name,
    target: Annotated[str, typer.Option(help="Task or pipeline to run.")],
    cron: Annotated[
        str | None, typer.Option(help="Crontab: 5 fields, or 6 with seconds first.")
    ] = None,
    every: Annotated[str | None, typer.Option(help="Interval: 30s, 15m, 2h, 1d.")] = None,
    at: Annotated[str | None, typer.Option(help="Once, at this date and time (ISO 8601).")] = None,
    tz: Annotated[str, typer.Option("--tz", help="IANA time zone for cron and --at.")] = "UTC",
    param: Annotated[
        list[str] | None, typer.Option("-p", "--param", help="key=value, repeatable.")
    ] = None,
    params_json: Annotated[str | None, typer.Option(help="Params as a JSON object.")] = None,
    misfire: Annotated[str, typer.Option(help="skip | run_once | catch_up:N")] = "skip",
    overlap: Annotated[str, typer.Option(help="allow | skip | queue")] = "allow",
    jitter: Annotated[float, typer.Option(help="Random delay up to this many seconds.")] = 0.0,
    start: Annotated[datetime | None, typer.Option(help="Not before (ISO 8601).")] = None,
    end: Annotated[datetime | None, typer.Option(help="Not after (ISO 8601).")] = None,
    project: Annotated[str, typer.Option(help="Project of the runs.")] = "default",
    queue: Annotated[str | None, typer.Option(help="Queue (default: the target's).")] = None,
    allow_unknown: AllowUnknown = False,
    json_out: JsonFlag = False,
) -> None:
    """Add a schedule. It takes effect within about a second, without a restart."""
    from conveyor import bootstrap

    kind, expression = _trigger(cron, every, at)
    policy, limit = sched.parse_misfire(misfire)
    spec = sched.ScheduleInput.parse(
        name=name,
        target=target,
        params=parse_params(param or [], params_json),
        trigger=kind,
        expression=expression,
        timezone=tz,
        start_at=_aware(start, tz),
        end_at=_aware(end, tz),
        misfire_policy=policy,
        catch_up_limit=limit,
        overlap_policy=overlap,
        jitter_s=jitter,
        project=project,
        queue=queue,
    )
    slots = _slots(kind, expression, tz, spec.start_at, spec.end_at)
    with cli_engine() as engine:
        catalog = bootstrap.catalog_for(get_settings(), engine, allow_unknown=allow_unknown)
        view = manage.add_schedule(
            UnitOfWork(engine),
            spec,
            slots,
            now=utc_now(),
            catalog=catalog,
        )
    _print(view, json_out)


def _aware(value: datetime | None, tz: str) -> datetime | None:
    from scheduler.triggers import zone

    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=zone(tz))


def _when(value: datetime | None, tz: str) -> str:
    if value is None:
        return "-"
    from scheduler.triggers import zone

    local = value.astimezone(zone(tz))
    return f"{local:%Y-%m-%d %H:%M:%S %Z}" + ("" if tz == "UTC" else f" ({value:%H:%M:%S} UTC)")


def _print(view: sched.ScheduleView, json_out: bool) -> None:
    if json_out:
        print_json(view.to_dict())
        return
    console.print(
        key_values(
            [
                ("name", view.name),
                ("target", f"{view.target_name} ({view.target_kind})"),
                ("trigger", f"{view.trigger} {view.expression} [{view.timezone}]"),
                ("enabled", view.enabled),
                ("next fire", _when(view.next_fire_at, view.timezone)),
                ("last fire", _when(view.last_fire_at, view.timezone)),
                (
                    "misfire",
                    view.misfire_policy
                    + (f":{view.catch_up_limit}" if view.catch_up_limit else ""),
                ),
                ("overlap", view.overlap_policy),
                ("params", view.params),
            ]
        )
    )


@schedules_app.command("list")
def list_(json_out: JsonFlag = False) -> None:
    """All schedules with their next fire time."""
    from rich.table import Table

    with cli_engine() as engine:
        views = manage.list_schedules(UnitOfWork(engine))
    if json_out:
        print_json([v.to_dict() for v in views])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "TARGET", "TRIGGER", "TZ", "ENABLED", "NEXT FIRE"):
        table.add_column(column)
    for v in views:
        table.add_row(
            v.name,
            v.target_name,
            f"{v.trigger} {v.expression}",
            v.timezone,
            "yes" if v.enabled else "paused",
            _when(v.next_fire_at, v.timezone),
        )
    console.print(table)


@schedules_app.command("show")
def show(name: Name, json_out: JsonFlag = False) -> None:
    """One schedule and its recent fires with their outcomes."""
    with cli_engine() as engine:
        view = manage.get_schedule(UnitOfWork(engine), name)
        fired = manage.recent_fires(UnitOfWork(engine), name)
    if json_out:
        print_json(view.to_dict() | {"fires": fired})
        return
    _print(view, False)
    for f in fired:
        console.print(
            f"  {_when(f['fire_at'], view.timezone)}  {f['outcome']}  {f['run_id'] or ''}"
        )


@schedules_app.command("preview")
def preview(
    name: Annotated[str | None, typer.Argument(help="A schedule, or use --cron/--every.")] = None,
    cron: Annotated[str | None, typer.Option(help="Preview a crontab expression.")] = None,
    every: Annotated[str | None, typer.Option(help="Preview an interval.")] = None,
    tz: Annotated[str, typer.Option("--tz", help="Time zone for --cron.")] = "UTC",
    next_: Annotated[int, typer.Option("--next", help="How many fire times.")] = 10,
    json_out: JsonFlag = False,
) -> None:
    """The next fire times of a schedule or an expression."""
    if name:
        with cli_engine() as engine:
            view = manage.get_schedule(UnitOfWork(engine), name)
        kind, expression, tz = view.trigger, view.expression, view.timezone
        slots = _slots(kind, expression, tz, view.start_at, view.end_at)
    else:
        kind, expression = _trigger(cron, every, None)
        slots = _slots(kind, expression, tz)
    if not 1 <= next_ <= 1000:
        raise InvalidInput("--next: between 1 and 1000", field="next")
    times = slots.preview(datetime.now(UTC), next_)
    if json_out:
        print_json([t.isoformat() for t in times])
        return
    for t in times:
        console.print(_when(t, tz))


@schedules_app.command("pause")
def pause(name: Name) -> None:
    """Stop firing (missed slots follow the misfire policy on resume)."""
    _set(name, False)


@schedules_app.command("resume")
def resume(name: Name) -> None:
    """Fire again."""
    _set(name, True)


def _set(name: str, enabled: bool) -> None:
    with cli_engine() as engine:
        view = manage.set_enabled(UnitOfWork(engine), name, enabled, now=utc_now())
    console.print(f"{view.name}: {'enabled' if view.enabled else 'paused'}")


@schedules_app.command("rm")
def rm(name: Name) -> None:
    """Delete a schedule and its fire history."""
    with cli_engine() as engine:
        manage.remove_schedule(UnitOfWork(engine), name)
    console.print(f"{name}: removed")


@schedules_app.command("fire")
def fire_now(name: Name, json_out: JsonFlag = False) -> None:
    """Run the schedule's target now (triggered_by=manual); its slots are unaffected."""
    from conveyor.cli.db import client

    with cli_engine() as engine:
        view = manage.get_schedule(UnitOfWork(engine), name)
    with client() as c:
        run = c.enqueue(
            view.target_name,
            view.params,
            project=view.project,
            queue=view.queue,
            priority=view.priority,
            triggered_by="manual",
            trigger_ref=f"schedule:{view.id}",
        )
    if json_out:
        print_json(run.to_dict())
    else:
        console.print(f"{run.id} {run.status} {run.name} (fired {name} by hand)")
