"""Fast-Flow's legacy pipeline webhook: `webhook_key` in pipeline.json, sent in the URL.

Off unless CONVEYOR_PIPELINE_LEGACY_WEBHOOKS is set, because a key in a URL ends up in proxy
and access logs; signed webhooks (`conveyor webhooks add`) are the way forward. A wrong key and
an unknown pipeline get the same answer, so the endpoint does not reveal which names exist.
"""

from __future__ import annotations

import hmac
from typing import Any

from domain.db.unit_of_work import UnitOfWork
from domain.errors import NotFound
from domain.pipelines.discovery import PipelineDirectory
from domain.ports import Catalog, Publisher
from domain.runs import enqueue
from domain.runs.requests import build_request


class LegacyHookNotFound(NotFound):
    """No pipeline webhook at this address."""


def accept(
    uow: UnitOfWork,
    directory: PipelineDirectory,
    name: str,
    key: str,
    params: dict[str, Any],
    *,
    delivery_id: str | None,
    publisher: Publisher | None,
    catalog: Catalog | None,
) -> enqueue.Enqueued:
    """The pipeline's run for this call; with a delivery id, one run per id."""
    found = directory.find(name)
    expected = found.config.webhook_key if found and found.runnable and found.config else None
    if not expected or not hmac.compare_digest(expected.encode(), key.encode()):
        raise LegacyHookNotFound()
    request = build_request(
        name=name,
        params=params,
        kind="pipeline",
        triggered_by="webhook",
        trigger_ref="legacy-webhook",
        idempotency_key=f"legacy-webhook:{name}:{delivery_id}" if delivery_id else None,
    )
    return enqueue.enqueue(uow, request, publisher=publisher, catalog=catalog)
