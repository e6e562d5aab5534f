"""/api/v1/schedules: CRUD, pause/resume, preview of fire times, and firing one by hand.
Admins manage schedules; readonly tokens read them; write tokens may fire one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.auth import Admin, Reader, Writer, client_ip
from api.state import ApiState, State
from domain.clock import utc_now
from domain.errors import ConveyorError, InvalidInput
from domain.pipelines.reads import TableCatalog
from domain.ports import Catalog
from domain.runs.requests import Priority
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.tasks.catalog import permissive
from scheduler.triggers import Slots, TriggerSpec

router = APIRouter(prefix="/api/v1/schedules", tags=["schedules"])

Name = Annotated[str, Path(min_length=1, max_length=200)]
MAX_PREVIEW = 1000


class Trigger(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trigger: Literal["cron", "interval", "once"]
    expression: str = Field(
        min_length=1,
        max_length=200,
        description="cron: 5 fields (or 6, seconds first); interval: 30s, 15m, 2h, 1d; "
        "once: an ISO 8601 date and time",
    )
    timezone: str = Field("UTC", min_length=1, max_length=64, description="IANA time zone")
    start_at: AwareDatetime | None = None
    end_at: AwareDatetime | None = None


class ScheduleFields(Trigger):
    """A schedule, as PUT replaces it (everything but its name)."""

    target: str = Field(min_length=1, max_length=200, description="Task or pipeline to run")
    target_kind: Literal["task", "pipeline"] = "task"
    params: dict[str, Any] = Field(default_factory=dict)
    project: str | None = Field(None, min_length=1, max_length=100)
    queue: str | None = Field(None, min_length=1, max_length=100)
    priority: Priority | None = None
    misfire_policy: Literal["skip", "run_once", "catch_up"] = "skip"
    catch_up_limit: int | None = Field(None, ge=1, le=sched.MAX_RECORDED_MISSES)
    overlap_policy: Literal["allow", "skip", "queue"] = "allow"
    jitter_s: float = Field(0.0, ge=0, le=3600)
    enabled: bool = True
    allow_unknown: bool = Field(
        False, description="Accept a target no worker has published yet (checked when it runs)"
    )


class NewSchedule(ScheduleFields):
    name: str = Field(min_length=1, max_length=200)


class PreviewRequest(Trigger):
    count: int = Field(10, ge=1, le=MAX_PREVIEW)


def slots_for(trigger: Trigger | Any, *, now: datetime) -> Slots:
    """The trigger's fire times; anything it cannot compute is the caller's InvalidInput."""
    try:
        slots = Slots(
            TriggerSpec(
                trigger.trigger,
                trigger.expression,
                trigger.timezone,
                trigger.start_at,
                trigger.end_at,
            )
        )
        slots.next_after(now)  # fail now on values only computing a time reveals as absurd
    except ConveyorError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, OSError):
        raise InvalidInput(
            f"expression: {trigger.expression[:80]!r} cannot be scheduled as {trigger.trigger}",
            field="expression",
        ) from None
    return slots


def catalog_for(state: ApiState, kind: str, *, allow_unknown: bool = False) -> Catalog | None:
    """Tasks resolve in the API's catalog; pipelines also in the `pipelines` table."""
    catalog = TableCatalog(state.engine, state.catalog) if kind == "pipeline" else state.catalog
    return permissive(catalog) if allow_unknown and catalog is not None else catalog


def _save(
    state: ApiState, who: str, request: Request, name: str, body: ScheduleFields, *, replace: bool
) -> dict[str, Any]:
    now = utc_now()
    fields = body.model_dump(exclude={"name", "target", "allow_unknown"}, exclude_none=True)
    fields.setdefault("project", state.settings.default_project)
    spec = sched.ScheduleInput.parse(name=name, target=body.target, source="api", **fields)
    with state.uow() as uow:  # add_schedule would report the foreign key as a name conflict
        if not uow.runs.project_exists(spec.project):
            raise InvalidInput(f"project: no project named {spec.project!r}", field="project")
    slots = slots_for(spec, now=now)
    catalog = catalog_for(state, spec.target_kind, allow_unknown=body.allow_unknown)
    view = manage.add_schedule(
        state.uow(),
        spec,
        slots,
        now=now,
        catalog=catalog,
        replace=replace,
        actor=who,
        ip=client_ip(request),
    )
    return view.to_dict()


@router.get("")
def list_schedules(state: State, _: Reader) -> dict[str, Any]:
    """Every schedule with its next and last fire time."""
    return {"items": [view.to_dict() for view in manage.list_schedules(state.reader())]}


@router.post("", status_code=201)
def create_schedule(
    state: State, who: Admin, request: Request, body: NewSchedule
) -> dict[str, Any]:
    """Add a schedule; the scheduler picks it up within about a second (409 if the name is
    taken)."""
    return _save(state, who.name, request, body.name, body, replace=False)


@router.post("/preview")
def preview_expression(state: State, _: Reader, body: PreviewRequest) -> dict[str, Any]:
    """The next `count` fire times of a trigger that is not saved (to check an expression)."""
    now = utc_now()
    return {"items": [t.isoformat() for t in slots_for(body, now=now).preview(now, body.count)]}


@router.get("/{name}")
def get_schedule(state: State, _: Reader, name: Name) -> dict[str, Any]:
    """The schedule and its 20 most recent fires with their outcomes."""
    view = manage.get_schedule(state.reader(), name)
    return {**view.to_dict(), "fires": manage.recent_fires(state.reader(), name)}


@router.put("/{name}")
def replace_schedule(
    state: State, who: Admin, request: Request, name: Name, body: ScheduleFields
) -> dict[str, Any]:
    """Replace a schedule's definition. A new trigger starts counting from now: slots of the
    old one are not fired as missed."""
    manage.get_schedule(state.reader(), name)  # 404 before anything else
    return _save(state, who.name, request, name, body, replace=True)


@router.delete("/{name}", status_code=204)
def delete_schedule(state: State, who: Admin, request: Request, name: Name) -> Response:
    """Delete a schedule and its fire history (the runs it made stay)."""
    manage.remove_schedule(state.uow(), name, actor=who.name, ip=client_ip(request))
    return Response(status_code=204)


@router.post("/{name}/pause")
def pause_schedule(state: State, who: Admin, request: Request, name: Name) -> dict[str, Any]:
    """Stop firing; on resume, missed slots follow the misfire policy."""
    view = manage.set_enabled(
        state.uow(), name, False, now=utc_now(), actor=who.name, ip=client_ip(request)
    )
    return view.to_dict()


@router.post("/{name}/resume")
def resume_schedule(state: State, who: Admin, request: Request, name: Name) -> dict[str, Any]:
    view = manage.set_enabled(
        state.uow(), name, True, now=utc_now(), actor=who.name, ip=client_ip(request)
    )
    return view.to_dict()


@router.get("/{name}/preview")
def preview_schedule(
    state: State,
    _: Reader,
    name: Name,
    count: Annotated[int, Query(ge=1, le=MAX_PREVIEW)] = 10,
) -> dict[str, Any]:
    """The schedule's next `count` fire times (UTC)."""
    view = manage.get_schedule(state.reader(), name)
    now = utc_now()
    return {"items": [t.isoformat() for t in slots_for(view, now=now).preview(now, count)]}


@router.post("/{name}/fire", status_code=201)
def fire_schedule(state: State, who: Writer, request: Request, name: Name) -> dict[str, Any]:
    """Run the schedule's target now (triggered_by=manual); its own slots are unaffected."""
    run = manage.fire_now(
        state.uow(),
        name,
        actor=who.name,
        ip=client_ip(request),
        publisher=state.publisher,
        catalog=lambda kind: catalog_for(state, kind),
    )
    return run.to_dict()
