"""Signed webhook deliveries accepted in batches: deliveries that arrive together are checked
one by one and recorded in one transaction, with the same answers, one by one, as
`webhooks.accept` would give each of them alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection

from domain.db import sql
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ConveyorError, TransientError
from domain.ports import Catalog, Publisher
from domain.runs import enqueue
from domain.runs.requests import build_request
from domain.webhooks.inbound import (
    Endpoint,
    WebhookNotFound,
    WebhookView,
    accept,
    check_delivery_id,
    check_signature,
    check_timestamp,
    deliveries,
    endpoints,
    idempotency_key,
    parse_payload,
)

#: What a delivery came to: its run (created or found again), or why it was refused.
Outcome = enqueue.Enqueued | ConveyorError


@dataclass(frozen=True, slots=True)
class Delivery:
    """One POST /hooks/{name} as it arrived: the hook's name, the three headers, the body."""

    name: str
    timestamp: str | None
    delivery_id: str | None
    signature: str | None
    body: bytes


@dataclass(frozen=True, slots=True)
class _Checked:
    hook: WebhookView
    delivery_id: str
    params: dict[str, Any]


def accept_batch(
    uow: Callable[[], UnitOfWork],
    batch: Sequence[Delivery],
    *,
    secret_key: str,
    now: datetime,
    tolerance_s: float,
    publisher: Publisher | None = None,
    catalog: Catalog | None = None,
    lookup: Callable[[set[str]], dict[str, Endpoint]] | None = None,
) -> list[Outcome]:
    """One outcome per delivery, in order. Checks run in the order the single path uses
    (endpoint, timestamp, delivery id, signature, body); the deliveries that pass are recorded
    together, each run with its delivery row, in one transaction. If that transaction fails
    for a reason that may belong to one delivery (a reused delivery id, params the target
    refuses, a project at its limit) nothing of it stays and each delivery is accepted alone,
    so every one gets its own answer; a database or broker outage is everyone's answer.

    `lookup` finds the enabled endpoints among some names (by default `webhooks.endpoints`,
    in a unit of work of its own)."""
    outcomes: list[Outcome | None] = [None] * len(batch)
    names = {d.name for d in batch}
    hooks = lookup(names) if lookup else endpoints(uow(), names, secret_key=secret_key)
    checked: dict[int, _Checked] = {}
    for i, delivery in enumerate(batch):
        try:
            checked[i] = _check(delivery, hooks, now=now, tolerance_s=tolerance_s)
        except ConveyorError as exc:
            outcomes[i] = exc
    if checked:
        try:
            results = _accept_together(uow(), list(checked.values()), publisher, catalog)
        except TransientError as exc:
            results = [exc] * len(checked)
        except ConveyorError:
            results = [_accept_alone(uow(), c, publisher, catalog) for c in checked.values()]
        for i, result in zip(checked, results, strict=True):
            outcomes[i] = result
    assert all(o is not None for o in outcomes)  # every delivery was answered above
    return cast(list[Outcome], outcomes)


def _check(
    delivery: Delivery,
    hooks: dict[str, Endpoint],
    *,
    now: datetime,
    tolerance_s: float,
) -> _Checked:
    found = hooks.get(delivery.name)
    if found is None:
        raise WebhookNotFound(f"no webhook named {delivery.name[:200]!r}")
    timestamp = check_timestamp(delivery.timestamp, now=now, tolerance_s=tolerance_s)
    delivery_id = check_delivery_id(delivery.delivery_id)
    check_signature(found.secret, timestamp, delivery.body, delivery.signature)
    return _Checked(found.hook, delivery_id, parse_payload(delivery.body))


def _accept_alone(
    uow: UnitOfWork, item: _Checked, publisher: Publisher | None, catalog: Catalog | None
) -> Outcome:
    try:
        return accept(
            uow, item.hook, item.delivery_id, item.params, publisher=publisher, catalog=catalog
        )
    except ConveyorError as exc:
        return exc


def _record_deliveries(items: list[_Checked], received: datetime) -> enqueue.Recorder:
    """Writes each delivery's row, pointing at the run it was given, in the runs' transaction."""

    def record(conn: Connection, results: list[enqueue.Enqueued]) -> None:
        rows = {  # one row per (webhook, delivery id): a repeat inside the batch is the same
            (item.hook.id, item.delivery_id): {
                "webhook_id": item.hook.id,
                "delivery_id": item.delivery_id,
                "run_id": result.run.id,
                "received_at": received,
            }
            for item, result in zip(items, results, strict=True)
        }
        conn.execute(
            sql.insert(conn, deliveries).on_conflict_do_nothing(
                index_elements=["webhook_id", "delivery_id"]
            ),
            list(rows.values()),
        )

    return record


def _accept_together(
    uow: UnitOfWork,
    items: list[_Checked],
    publisher: Publisher | None,
    catalog: Catalog | None,
) -> list[Outcome]:
    requests = [
        build_request(
            name=item.hook.target_name,
            params=item.params,
            project=item.hook.project,
            kind=item.hook.target_kind,
            idempotency_key=idempotency_key(item.hook, item.delivery_id),
            triggered_by="webhook",
            trigger_ref=f"{item.hook.name}:{item.delivery_id}"[:255],
        )
        for item in items
    ]
    return list(
        enqueue.enqueue_many(
            uow,
            requests,
            publisher=publisher,
            catalog=catalog,
            record=_record_deliveries(items, uow.clock()),
        )
    )
