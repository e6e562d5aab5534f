"""Child runs: `ctx.spawn` / `ctx.spawn_many` create them, `ctx.gather` waits for them.

Spawning is a checkpointed step: a replay returns the children it made, and each child's
idempotency key comes from the step's key, so a step interrupted after its children were
committed makes no second set. A child belongs to the parent's project unless told otherwise,
and names it as its parent. Gathering waits holding no worker: while a child is unfinished the
run is `waiting` (reason `children`) until the relay wakes it (domain/runs/gathering.py); once
all have ended it returns their results in order, or raises ChildFailed naming those that did
not succeed.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ChildFailed, InvalidInput
from domain.ports import Catalog
from domain.runs import gathering
from domain.runs.enqueue import enqueue_many
from domain.runs.requests import build_request
from domain.runs.states import TERMINAL, Status
from worker.steps import StepHost, StepRunner, Suspend

MAX_KEY = 255


@dataclass(frozen=True, slots=True)
class Child:
    """A spawned run, as `ctx.gather` takes it."""

    run_id: uuid.UUID
    name: str


def spawn_many(
    runner: StepRunner,
    host: StepHost,
    catalog: Catalog | None,
    items: Sequence[Mapping[str, Any]],
    *,
    step_name: str,
) -> list[Child]:
    """Create children, one per item (`name`, optional `params`, enqueue options), in one
    batch, as the checkpointed step `step_name`."""
    prepared = [_item(item, i) for i, item in enumerate(items)]

    def create() -> list[dict[str, str]]:
        key = runner.key
        assert key is not None  # inside the step
        requests = [
            build_request(
                name=name,
                params=params,
                project=options.pop("project", host.project),
                parent_run_id=host.run_id,
                idempotency_key=_child_key(key, i),
                triggered_by="spawn",
                trigger_ref=str(host.run_id),
                **options,
            )
            for i, (name, params, options) in enumerate(prepared)
        ]
        made = enqueue_many(UnitOfWork(host._engine), requests, catalog=catalog)
        return [{"run_id": str(m.run.id), "name": m.run.name} for m in made]

    stored = runner.run(step_name, create, (), {}, retries=0, backoff=1.0, step_type="spawn")
    return [Child(uuid.UUID(c["run_id"]), c["name"]) for c in stored]


def gather(
    runner: StepRunner, host: StepHost, children: Iterable[Child | uuid.UUID | str]
) -> list[Any]:
    """The children's results in order once all have ended; waits (no worker) until then."""
    ids = [_run_id(child) for child in children]
    occurrence, done = runner.reach("gather")
    if done is not None:
        return list(done.result["results"])
    with host._engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                select(
                    runs.c.id, runs.c.name, runs.c.status, runs.c.result, runs.c.error_type
                ).where(runs.c.id.in_(ids))
            )
        }
    missing = [str(i) for i in ids if i not in rows]
    if missing:
        raise InvalidInput(f"gather: no run with id {', '.join(missing)}", field="children")
    if any(rows[i].status not in TERMINAL for i in ids):
        with host._engine.connect() as conn:
            swept = gathering.woken_by_sweep(conn, host.run_id, ids)
        wait_s = gathering.GATHER_NET_S if swept else gathering.GATHER_POLL_S
        raise Suspend(host._clock() + timedelta(seconds=wait_s), gathering.REASON)
    failed = [rows[i] for i in ids if rows[i].status != Status.SUCCEEDED]
    if failed:
        named = ", ".join(f"{r.id} ({r.name}: {r.status}, {r.error_type})" for r in failed)
        problem = ChildFailed(f"{len(failed)} of {len(ids)} children did not succeed: {named}")
        runner.settle("gather", occurrence, "gather", status="failed", detail=_cut(str(problem)))
        raise problem
    results = [rows[i].result for i in ids]
    masked = host.masker.data(results)
    runner.settle("gather", occurrence, "gather", status="completed", result=masked)
    return results


def _item(item: Mapping[str, Any], index: int) -> tuple[str, Any, dict[str, Any]]:
    if not isinstance(item, Mapping) or "name" not in item:
        raise InvalidInput(f"spawn_many[{index}]: an object with a name (got {item!r})")
    options = dict(item)
    name = options.pop("name")
    params = options.pop("params", None) or {}
    for reserved in ("parent_run_id", "idempotency_key", "triggered_by", "trigger_ref"):
        if reserved in options:
            raise InvalidInput(f"spawn: {reserved} is set by conveyor for a child", field=reserved)
    return name, params, options


def _child_key(step_key: str, index: int) -> str:
    key = f"{step_key}:{index}"
    if len(key) <= MAX_KEY:
        return key
    return "spawn:" + hashlib.sha256(key.encode()).hexdigest()


def _run_id(child: Child | uuid.UUID | str) -> uuid.UUID:
    if isinstance(child, Child):
        return child.run_id
    try:
        return child if isinstance(child, uuid.UUID) else uuid.UUID(str(child))
    except ValueError:
        raise InvalidInput(f"gather: {child!r} is not a child run", field="children") from None


def _cut(text: str, most: int = 2000) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"
