"""Chains: a follow-up run per parent outcome, exactly once.

`@task(on_success="next", on_failure="handler")`: the follow-up is inserted in the same
transaction as the parent's final state, under the idempotency key `chain:<parent>:<outcome>`,
so a retried final write cannot make a second one. `Client.enqueue(..., after=run_id)` holds a
run until its parent ends: released when it succeeded, cancelled (with the reason) otherwise.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, select, update

from domain.db.models import runs
from domain.errors import ConfigurationError, ConveyorError
from domain.ports import Dispatch
from domain.runs.repository import RunRepository
from domain.runs.requests import build_request
from domain.runs.states import TERMINAL, Status
from domain.schedules.definitions import HELD
from domain.tasks.registry import Registry, RegistryCatalog, TaskSpec

log = structlog.get_logger("conveyor.chains")

FAILURE_OUTCOMES = {Status.FAILED, Status.TIMED_OUT, Status.BUDGET_EXCEEDED}


def check_chains(registry: Registry) -> None:
    """Every chain target exists and on_success links form no cycle (it would never end)."""
    for name in registry.names():
        spec = registry.get(name)
        for target in filter(None, (spec.on_success, spec.on_failure)):
            if target not in registry:
                raise ConfigurationError(
                    f"task {name!r} chains to {target!r}, which is not a registered task"
                )
        seen = [name]
        current = spec.on_success
        while current is not None:
            if current in seen:
                cycle = " -> ".join([*seen[seen.index(current) :], current])
                raise ConfigurationError(f"chain cycle: {cycle}")
            seen.append(current)
            current = registry.get(current).on_success


def follow_up_params(target: TaskSpec, offered: dict[str, Any]) -> dict[str, Any]:
    """The offered values the target declares as parameters (others are dropped)."""
    fields = target.params_model.model_fields
    return {k: v for k, v in offered.items() if k in fields}


def chain_possible(registry: Registry, parent: Any) -> bool:
    """Whether the parent's task declares a follow-up for some outcome (chain_follow_up may
    insert a run), so its final state must be written in a transaction that can hold one."""
    if parent.kind != "task" or parent.name not in registry:
        return False
    spec = registry.get(parent.name)
    return spec.on_success is not None or spec.on_failure is not None


def chain_follow_up(
    conn: Connection,
    registry: Registry,
    *,
    parent: Any,
    status: str,
    result: Any,
    error_type: str | None,
    error: str | None,
    now: datetime,
) -> Dispatch | None:
    """Insert the follow-up run for this outcome, if the parent's task declares one.

    on_success gets the parent's result (a dict) as params; on_failure gets run_id, status,
    error_type and error; each filtered to the parameters the target declares. A follow-up
    whose params do not validate is logged and skipped, never failing the parent's record.
    """
    if parent.kind != "task" or parent.name not in registry:
        return None
    spec = registry.get(parent.name)
    if status == Status.SUCCEEDED:
        target_name = spec.on_success
        offered = result if isinstance(result, dict) else {"result": result}
    elif status in FAILURE_OUTCOMES:
        target_name = spec.on_failure
        offered = {
            "run_id": str(parent.run_id),
            "status": status,
            "error_type": error_type,
            "error": error,
        }
    else:
        return None
    if target_name is None:
        return None
    from domain.runs.rows import run_row

    try:
        target = registry.get(target_name)
        request = build_request(
            name=target_name,
            params=follow_up_params(target, offered),
            project=parent.project,
            triggered_by="chain",
            trigger_ref=f"{parent.name}:{status}",
            parent_run_id=parent.run_id,
            idempotency_key=f"chain:{parent.run_id}:{status}",
        )
        row = run_row(request, RegistryCatalog(registry), now, publish_now=False)
    except ConveyorError as exc:
        log.error(
            "chain.refused", parent_run_id=str(parent.run_id), target=target_name, reason=str(exc)
        )
        return None
    if RunRepository(conn).insert_one(row):
        log.info(
            "chain.enqueued",
            parent_run_id=str(parent.run_id),
            run_id=str(row["id"]),
            target=target_name,
            outcome=status,
        )
        return Dispatch(row["id"], row["name"], row["queue"], row["priority"], row["params"])
    return None


def release_after(engine: Engine, *, now: datetime) -> tuple[int, int]:
    """Runs waiting on a parent (`after=`): released if it succeeded, cancelled if it ended
    otherwise. Returns (released, cancelled)."""
    parent = runs.alias("parent")
    with engine.begin() as conn:
        waiting = conn.execute(
            select(runs.c.id, parent.c.status)
            .join(parent, parent.c.id == runs.c.parent_run_id)
            .where(
                runs.c.status == Status.PENDING,
                runs.c.not_before == HELD,
                runs.c.triggered_by == "chain",
                parent.c.status.in_(list(TERMINAL)),
            )
        ).all()
        released = cancelled = 0
        for run_id, parent_status in waiting:
            if parent_status == Status.SUCCEEDED:
                conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id)
                    .values(not_before=now, dispatched_at=None)
                )
                released += 1
            else:
                conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id)
                    .values(
                        status=Status.CANCELLED,
                        finished_at=now,
                        error_type="ParentNotSucceeded",
                        error=f"the run it waited for ended as {parent_status}",
                    )
                )
                cancelled += 1
    return released, cancelled


def hold_after(row: dict[str, Any], after: uuid.UUID) -> dict[str, Any]:
    """Make a new run's row wait for `after` (the sweep releases or cancels it)."""
    return row | {
        "parent_run_id": after,
        "not_before": HELD,
        "dispatched_at": None,
        "dispatch_attempts": 0,
        "triggered_by": "chain",
    }
