"""Signed webhooks in: endpoints with encrypted secrets, signature checks, and one run per
producer delivery id (guarantee 4), recorded in the same transaction as the run."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, select
from sqlalchemy.exc import IntegrityError

from domain.db import sql
from domain.db.models_platform import Pipeline, Webhook, WebhookDelivery
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, InvalidInput, NotFound
from domain.ports import Catalog, Publisher, require_known
from domain.runs import enqueue
from domain.runs.enqueue import Recorder
from domain.runs.requests import build_request
from domain.runs.views import jsonable
from domain.security import audit, crypto
from domain.security.tokens import Unauthorized, check_name

webhooks = cast(Table, Webhook.__table__)
deliveries = cast(Table, WebhookDelivery.__table__)
pipelines = cast(Table, Pipeline.__table__)

TOLERANCE_S = 300
MAX_DELIVERY_ID = 200
KINDS = ("task", "pipeline")


class WebhookNotFound(NotFound):
    """No webhook endpoint has this name."""


class BadSignature(Unauthorized):
    """The webhook signature does not match the body."""


class StaleTimestamp(Unauthorized):
    """The webhook timestamp is outside the accepted window."""


class BadDelivery(InvalidInput):
    """The webhook request is malformed."""


class MalformedPayload(BadDelivery):
    """The webhook body is not a JSON object."""


@dataclass(frozen=True, slots=True)
class WebhookView:
    id: int
    name: str
    project: str
    target_kind: str
    target_name: str
    enabled: bool
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        data = {key: jsonable(value) for key, value in asdict(self).items()}
        data["path"] = f"/hooks/{self.name}"
        return data


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A webhook with its signing secret decrypted, for checking one delivery."""

    hook: WebhookView
    secret: str


# -- management -------------------------------------------------------------------------------
def add_webhook(
    uow: UnitOfWork,
    name: str,
    *,
    target: str,
    secret_key: str,
    kind: str = "task",
    project: str = "default",
    actor: str,
    ip: str | None = None,
    catalog: Catalog | None = None,
) -> tuple[WebhookView, str]:
    """Create an endpoint; returns it and its signing secret (shown once, stored encrypted).

    With a `catalog`, a target it does not know is refused now, not at the first delivery."""
    check_name(name)
    check_name(target, what="target")
    if kind not in KINDS:
        raise InvalidInput(f"kind: expected task or pipeline (got {kind!r})", field="kind")
    secret = "whsec_" + secrets.token_urlsafe(32)
    ciphertext = crypto.encrypt(secret_key, secret)
    if catalog is not None:
        require_known(catalog, target)
    with uow:
        if not uow.runs.project_exists(project):
            raise InvalidInput(f"project: no project named {project!r}", field="project")
        try:
            row = (
                uow.conn.execute(
                    webhooks.insert()
                    .values(
                        name=name,
                        project=project,
                        target_kind=kind,
                        target_name=target,
                        secret_ciphertext=ciphertext,
                        enabled=True,
                        created_at=uow.clock(),
                    )
                    .returning(*webhooks.c)
                )
                .mappings()
                .one()
            )
        except IntegrityError:
            raise Conflict(f"a webhook named {name!r} already exists", name=name) from None
        audit.record(
            uow,
            actor=actor,
            action="webhook.add",
            target_type="webhook",
            target_id=name,
            details={"target": target, "kind": kind, "project": project},
            ip=ip,
        )
        uow.commit()
    return _view(row), secret


def list_webhooks(uow: UnitOfWork) -> list[WebhookView]:
    with uow:
        rows = uow.conn.execute(select(webhooks).order_by(webhooks.c.name)).mappings()
        return [_view(row) for row in rows]


def remove_webhook(uow: UnitOfWork, name: str, *, actor: str, ip: str | None = None) -> None:
    """Delete the endpoint and its delivery records (runs it created stay)."""
    with uow:
        deleted = uow.conn.execute(webhooks.delete().where(webhooks.c.name == name)).rowcount
        if not deleted:
            raise WebhookNotFound(f"no webhook named {name!r}", name=name)
        audit.record(
            uow, actor=actor, action="webhook.remove", target_type="webhook", target_id=name, ip=ip
        )
        uow.commit()


def endpoint(uow: UnitOfWork, name: str, *, secret_key: str) -> Endpoint:
    """The enabled endpoint called `name` with its secret; WebhookNotFound otherwise."""
    with uow:
        row = (
            uow.conn.execute(
                select(webhooks).where(webhooks.c.name == name, webhooks.c.enabled.is_(True))
            )
            .mappings()
            .first()
        )
    if row is None:
        raise WebhookNotFound(f"no webhook named {name[:200]!r}")
    return Endpoint(_view(row), crypto.decrypt(secret_key, row["secret_ciphertext"]))


def endpoints(uow: UnitOfWork, names: set[str], *, secret_key: str) -> dict[str, Endpoint]:
    """The enabled endpoints among `names`, with their secrets, by name (one query)."""
    with uow:
        rows = uow.conn.execute(
            select(webhooks).where(webhooks.c.name.in_(sorted(names)), webhooks.c.enabled.is_(True))
        ).mappings()
        return endpoints_of(rows, secret_key=secret_key)


def endpoints_of(rows: Iterable[Mapping[Any, Any]], *, secret_key: str) -> dict[str, Endpoint]:
    """Webhook rows (every column) as endpoints with their secrets decrypted, by name."""
    return {
        row["name"]: Endpoint(_view(row), crypto.decrypt(secret_key, row["secret_ciphertext"]))
        for row in rows
    }


# -- checking a delivery ----------------------------------------------------------------------
def signature(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of "timestamp.body">`, the X-Conveyor-Signature value."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def check_timestamp(timestamp: str | None, *, now: datetime, tolerance_s: float) -> str:
    """The X-Conveyor-Timestamp value if it is unix seconds within ±tolerance of `now`."""
    if not timestamp or not timestamp.isdigit() or len(timestamp) > 12:
        raise StaleTimestamp("X-Conveyor-Timestamp: missing or not unix seconds")
    skew = abs(now.timestamp() - int(timestamp))
    if skew > tolerance_s:
        raise StaleTimestamp(
            f"X-Conveyor-Timestamp is {skew:.0f}s away from the server's clock "
            f"(accepted: ±{tolerance_s:g}s); sign each delivery when you send it"
        )
    return timestamp


def check_signature(secret: str, timestamp: str, body: bytes, given: str | None) -> None:
    if not given or not hmac.compare_digest(signature(secret, timestamp, body), given.strip()):
        raise BadSignature(
            "X-Conveyor-Signature does not match: expected sha256=<hex HMAC-SHA256 of "
            '"{timestamp}.{raw body}"> with this webhook\'s secret'
        )


def check_delivery_id(value: str | None) -> str:
    if not value or len(value) > MAX_DELIVERY_ID or not value.isprintable():
        raise BadDelivery(
            f"X-Conveyor-Delivery: the producer's unique id for this delivery is required "
            f"(1-{MAX_DELIVERY_ID} printable characters)",
            field="X-Conveyor-Delivery",
        )
    return value


def parse_payload(body: bytes) -> dict[str, Any]:
    """The body as a JSON object (the run's params); anything else is MalformedPayload."""
    try:
        value = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise MalformedPayload("body: not valid JSON", field="body") from None
    if not isinstance(value, dict):
        raise MalformedPayload(
            f"body: must be a JSON object (got {type(value).__name__})", field="body"
        )
    return value


# -- accepting a delivery ---------------------------------------------------------------------
def _record_delivery(hook: WebhookView, delivery_id: str, received: datetime) -> Recorder:
    """Writes the delivery's row, pointing at its run (made now or found by the key), in the
    run's transaction. The pipeline's webhook_runs moves with the run's outcome, in its final
    transaction (pipeline_store.record_outcome), so it is not counted here."""

    def record(conn: Connection, results: list[enqueue.Enqueued]) -> None:
        conn.execute(
            sql.insert(conn, deliveries)
            .values(
                webhook_id=hook.id,
                delivery_id=delivery_id,
                run_id=results[0].run.id,
                received_at=received,
            )
            .on_conflict_do_nothing(index_elements=["webhook_id", "delivery_id"])
        )

    return record


def idempotency_key(hook: WebhookView, delivery_id: str) -> str:
    # The runs table's UNIQUE(project, idempotency_key) is what makes concurrent duplicates
    # collapse onto one run; the webhook id keeps two endpoints' delivery ids apart.
    return f"webhook:{hook.id}:{delivery_id}"


def accept(
    uow: UnitOfWork,
    hook: WebhookView,
    delivery_id: str,
    params: dict[str, Any],
    *,
    publisher: Publisher | None = None,
    catalog: Catalog | None = None,
) -> enqueue.Enqueued:
    """The run for this delivery: created now (created=True) or the one an earlier delivery
    with the same id created. The same id with a different body is a Conflict."""
    key = idempotency_key(hook, delivery_id)
    request = build_request(
        name=hook.target_name,
        params=params,
        project=hook.project,
        kind=hook.target_kind,
        idempotency_key=key,
        triggered_by="webhook",
        trigger_ref=f"{hook.name}:{delivery_id}"[:255],
    )
    try:
        return enqueue.enqueue_many(
            uow,
            [request],
            publisher=publisher,
            catalog=catalog,
            record=_record_delivery(hook, delivery_id, uow.clock()),
        )[0]
    except Conflict as exc:
        raise Conflict(
            f"X-Conveyor-Delivery {delivery_id!r} was already used for a different body; "
            "a new delivery needs a new id",
            run_id=exc.context.get("run_id"),
        ) from None


def _view(row: Any) -> WebhookView:
    return WebhookView(
        id=row["id"],
        name=row["name"],
        project=row["project"],
        target_kind=row["target_kind"],
        target_name=row["target_name"],
        enabled=row["enabled"],
        created_at=row["created_at"],
    )
