"""The run's row as every way of creating runs writes it: enqueue, schedules, chains."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from domain.clock import uuid7
from domain.errors import InvalidInput
from domain.flow import concurrency
from domain.ports import Catalog, TargetDefaults
from domain.runs.requests import EnqueueRequest
from domain.runs.states import Status


def run_row(
    req: EnqueueRequest,
    catalog: Catalog,
    now: datetime,
    publish_now: bool,
    run_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """The run's row, as every way of creating runs writes it (enqueue, schedules, chains).
    `publish_now`: it is delivered right after commit (by the publisher, or
    inline by the caller), so the relay leaves it alone for the grace period."""
    defaults, params = catalog.resolve(req.name, req.params)
    due = req.due_at(now)
    key = most = None
    if req.concurrency_key is not None or defaults.concurrency_max is not None:
        key, most = _concurrency(req, defaults, params)
    elif req.concurrency_max is not None:
        raise InvalidInput(
            f"concurrency_max: task {req.name!r} has no concurrency key; pass concurrency_key",
            field="concurrency_max",
        )
    return {
        "id": run_id or uuid7(),
        "project": req.project,
        "kind": defaults.kind if req.kind == "task" else req.kind,
        "name": req.name,
        "queue": req.queue or defaults.queue or "default",
        "priority": _first(req.priority, defaults.priority, DEFAULT_PRIORITY),
        "params": params,
        "status": Status.PENDING.value,
        "attempt": 0,
        "max_attempts": _first(req.max_attempts, defaults.max_attempts, 1),
        "idempotency_key": req.idempotency_key,
        "triggered_by": req.triggered_by,
        "trigger_ref": req.trigger_ref,
        "not_before": due,
        # A run due now is published right after commit; a deferred one waits for the relay.
        "dispatched_at": now if publish_now and due <= now else None,
        "dispatch_attempts": 1 if publish_now and due <= now else 0,
        "timeout_s": _first(req.timeout_s, defaults.timeout_s, None),
        "budget_usd": req.budget_usd,
        "max_requests": req.max_requests,
        "max_minutes": req.max_minutes,
        "cost_usd": 0,
        "tokens_in": 0,
        "tokens_out": 0,
        "requests_made": 0,
        "created_at": now,
        "parent_run_id": req.parent_run_id,
        "callback_url": req.callback_url,
        "concurrency_key": key,
        "concurrency_max": most,
        "rate_limit": defaults.rate_limit,
        "paced": False,
    }


def _concurrency(
    req: EnqueueRequest, defaults: TargetDefaults, params: dict[str, Any]
) -> tuple[str, int]:
    """The run's concurrency key and max: as asked, else from its task's Limit."""
    key = req.concurrency_key
    if key is None:
        key = concurrency.render(defaults.concurrency_key, params, task=req.name)
    return key, req.concurrency_max or defaults.concurrency_max or 1


DEFAULT_PRIORITY = 5


def _first(*values: Any) -> Any:
    for value in values:  # a plain loop: this runs five times per enqueued run
        if value is not None:
            return value
    return None
