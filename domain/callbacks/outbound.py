"""Callbacks and notifications out: which finished runs owe a signed POST, what it says, and
what each attempt did. The HTTP itself is scheduler/deliveries.py's; nothing here blocks a worker.

The scheduler leader calls `discover` about once a second: it reads runs that finished since the
`outbound` sweep cursor (minus an overlap, so a run whose final transaction committed a moment
after a later-stamped one is still seen) and queues one `outbound_deliveries` row per target:
the run's `callback_url`, and the URL of each notification rule it matches. UNIQUE(run_id, kind,
rule_id) makes re-reading the overlap harmless. `claim_due` hands out due rows with a short lease;
`record` writes each attempt to the row and, as a line with stream="event", to the run's logs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Connection, Engine, Table, and_, or_, select, update

from domain.callbacks.messages import MAX_ERROR, encode, signing_key, slack_message, summary
from domain.callbacks.rules import Rule, rules, shown_url
from domain.db import cursors, sql
from domain.db.models import run_logs, runs
from domain.db.models_platform import OutboundDelivery, Webhook, WebhookDelivery
from domain.errors import ConfigurationError
from domain.runs.lines import next_seq
from domain.runs.states import TERMINAL
from domain.runs.views import RunView, jsonable
from domain.security import crypto

deliveries = cast(Table, OutboundDelivery.__table__)
webhooks = cast(Table, Webhook.__table__)
webhook_deliveries = cast(Table, WebhookDelivery.__table__)

CURSOR = "outbound"
#: how far before the cursor each sweep looks again: a finish stamped at T may commit after one
#: stamped T+x; the unique constraint turns the re-reads into no-ops
OVERLAP = timedelta(seconds=5)
PAGE = 500
MAX_PAGES = 20


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """How long and how often a delivery is tried (Settings.outbound_*)."""

    deadline_s: float = 3600.0
    backoff_s: float = 2.0
    backoff_max_s: float = 300.0
    #: a claimed delivery is not handed out again for this long (the POST's timeout + margin)
    claim_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Any) -> OutboundPolicy:
        return cls(
            deadline_s=settings.outbound_deadline_s,
            backoff_s=settings.outbound_backoff_s,
            backoff_max_s=settings.outbound_backoff_max_s,
            claim_s=settings.outbound_timeout_s + 10.0,
        )

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt, after `attempts` failed ones (exponential)."""
        return float(min(self.backoff_s * 2 ** min(attempts - 1, 30), self.backoff_max_s))


# -- discovering what is owed ------------------------------------------------------------------
def targets_for(
    run_id: uuid.UUID,
    name: str,
    status: str,
    finished_at: datetime,
    callback_url: str | None,
    rule_list: Sequence[Rule],
) -> list[tuple[str, int, str]]:
    """(kind, rule_id, url) for each POST a finished run owes: its callback, then its rules."""
    owed = [("callback", 0, callback_url)] if callback_url else []
    owed += [
        ("notify", rule.id, rule.url)
        for rule in rule_list
        if rule.matches(status=status, name=name, finished_at=finished_at)
    ]
    return owed


def discover(
    engine: Engine, *, now: datetime, rule_list: Sequence[Rule], policy: OutboundPolicy
) -> int:
    """Queue deliveries for runs finished since the cursor; returns how many rows were new."""
    with engine.begin() as conn:
        position = cursors.read(conn, CURSOR)
        if position is None:  # first sweep ever: runs that ended within the deadline still count
            position = now - timedelta(seconds=policy.deadline_s)
        owed: ColumnElement[bool] = runs.c.callback_url.is_not(None)
        statuses = sorted({s for rule in rule_list if rule.enabled for s in rule.on_statuses})
        if statuses:
            owed = or_(owed, runs.c.status.in_(statuses))
        base = (
            select(runs.c.id, runs.c.name, runs.c.status, runs.c.callback_url, runs.c.finished_at)
            .where(runs.c.finished_at >= position - OVERLAP, runs.c.status.in_(sorted(TERMINAL)))
            .where(owed)
            .order_by(runs.c.finished_at, runs.c.id)
            .limit(PAGE)
        )
        added = 0
        newest = position
        after: tuple[datetime, uuid.UUID] | None = None
        for _ in range(MAX_PAGES):
            stmt = base
            if after is not None:
                stmt = stmt.where(
                    or_(
                        runs.c.finished_at > after[0],
                        and_(runs.c.finished_at == after[0], runs.c.id > after[1]),
                    )
                )
            page = conn.execute(stmt).all()
            rows = [
                {
                    "run_id": run_id,
                    "kind": kind,
                    "rule_id": rule_id,
                    "url": url,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for run_id, name, status, callback, finished in page
                for kind, rule_id, url in targets_for(
                    run_id, name, status, finished, callback, rule_list
                )
            ]
            added += _insert_new(conn, rows)
            if page:
                after = (page[-1].finished_at, page[-1].id)
                newest = max(newest, after[0])
            if len(page) < PAGE:
                break
        cursors.move(conn, CURSOR, newest, now)
    return added


def _insert_new(conn: Connection, rows: list[dict[str, Any]]) -> int:
    if not rows:
        return 0
    stmt = (
        sql.insert(conn, deliveries)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["run_id", "kind", "rule_id"])
        .returning(deliveries.c.id)
    )
    return len(conn.execute(stmt).all())


# -- handing out what is due -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Due:
    """One delivery to attempt now, with what its POST needs."""

    id: int
    run_id: uuid.UUID
    kind: str
    rule_id: int
    url: str
    attempts: int
    created_at: datetime


def claim_due(engine: Engine, *, now: datetime, limit: int, policy: OutboundPolicy) -> list[Due]:
    """Up to `limit` due deliveries, each leased for `policy.claim_s` so that no other sweep
    (a leader that took over meanwhile) sends it at the same time."""
    pending = and_(
        deliveries.c.delivered_at.is_(None),
        deliveries.c.gave_up_at.is_(None),
        deliveries.c.next_attempt_at <= now,
    )
    ids = select(deliveries.c.id).where(pending).order_by(deliveries.c.next_attempt_at)
    with engine.begin() as conn:
        rows = conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(ids.limit(limit)), pending)
            .values(next_attempt_at=now + timedelta(seconds=policy.claim_s))
            .returning(
                deliveries.c.id,
                deliveries.c.run_id,
                deliveries.c.kind,
                deliveries.c.rule_id,
                deliveries.c.url,
                deliveries.c.attempts,
                deliveries.c.created_at,
            )
        ).all()
    return sorted((Due(*row) for row in rows), key=lambda d: d.id)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A claimed delivery with its body and signing secret; `problem` when it cannot be sent."""

    due: Due
    run: RunView | None
    body: bytes
    secret: str
    delivery_id: str
    problem: str | None = None


def prepare(engine: Engine, dues: Sequence[Due], *, secret_key: str) -> list[Outgoing]:
    """Bodies and secrets for claimed deliveries: a callback of a run a webhook created is
    signed with that webhook's secret, everything else with the key from CONVEYOR_SECRET_KEY."""
    run_ids = list({d.run_id for d in dues})
    with engine.connect() as conn:
        found = {
            row.id: RunView.from_row(row)
            for row in conn.execute(select(runs).where(runs.c.id.in_(run_ids))).mappings()
        }
        formats = dict(
            conn.execute(
                select(rules.c.id, rules.c.format).where(
                    rules.c.id.in_({d.rule_id for d in dues if d.kind == "notify"})
                )
            ).all()
        )
        hook_secrets = dict(
            conn.execute(
                select(webhook_deliveries.c.run_id, webhooks.c.secret_ciphertext)
                .join(webhooks, webhooks.c.id == webhook_deliveries.c.webhook_id)
                .where(webhook_deliveries.c.run_id.in_(run_ids))
            ).all()
        )
    out = []
    for due in dues:
        run = found.get(due.run_id)
        if run is None:
            out.append(Outgoing(due, None, b"", "", "", problem="the run no longer exists"))
            continue
        delivery_id = f"{run.id}:{run.attempt}"
        fmt = formats.get(due.rule_id, "json") if due.kind == "notify" else "json"
        body = encode(slack_message(run) if fmt == "slack" else summary(run))
        try:
            ciphertext = hook_secrets.get(run.id) if due.kind == "callback" else None
            if ciphertext is not None:
                secret = crypto.decrypt(secret_key, ciphertext)
            else:
                secret = signing_key(secret_key)
        except ConfigurationError as exc:
            out.append(Outgoing(due, run, body, "", delivery_id, problem=f"cannot sign: {exc}"))
            continue
        out.append(Outgoing(due, run, body, secret, delivery_id))
    return out


# -- recording attempts ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Result:
    """How one POST went: a 2xx `status_code`, or `error` (transport problem or other status)."""

    status_code: int | None = None
    error: str | None = None
    #: Trying again cannot help (the address is refused): give up at once.
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


def record(
    engine: Engine, item: Outgoing, result: Result, *, now: datetime, policy: OutboundPolicy
) -> str:
    """Write one attempt to its delivery row and as an event line in the run's logs.

    Returns `delivered`, `retry`, `gave_up`, or `stale` when the row was settled meanwhile."""
    due = item.due
    attempts = due.attempts + 1
    values: dict[str, Any] = {"attempts": attempts}
    fields: dict[str, Any] = {
        "delivery": due.kind,
        "rule_id": due.rule_id or None,
        "url": shown_url(due.url),
        "delivery_id": item.delivery_id,
        "delivery_attempt": attempts,
        "status_code": result.status_code,
    }
    label = "callback" if due.kind == "callback" else f"notification (rule {due.rule_id})"
    where = f"{label} to {shown_url(due.url)}"
    if result.ok:
        outcome, level = "delivered", "info"
        values |= {"delivered_at": now, "last_error": None}
        message = f"{where} delivered (HTTP {result.status_code}, attempt {attempts})"
    else:
        error = (result.error or f"HTTP {result.status_code}")[:MAX_ERROR]
        fields["error"] = error
        delay = policy.delay(attempts)
        next_at = now + timedelta(seconds=delay)
        values["last_error"] = error
        late = next_at > due.created_at + timedelta(seconds=policy.deadline_s)
        if late or item.run is None or result.permanent:
            outcome, level = "gave_up", "error"
            values["gave_up_at"] = now
            message = f"{where} failed: {error} (attempt {attempts}); giving up"
        else:
            outcome, level = "retry", "warning"
            values["next_attempt_at"] = next_at
            fields["next_attempt_at"] = jsonable(next_at)
            message = f"{where} failed: {error} (attempt {attempts}); next try in {delay:g}s"
    fields["event"] = f"outbound.{outcome}"
    with engine.begin() as conn:
        settled = conn.execute(
            update(deliveries)
            .where(
                deliveries.c.id == due.id,
                deliveries.c.delivered_at.is_(None),
                deliveries.c.gave_up_at.is_(None),
            )
            .values(values)
        ).rowcount
        if not settled:
            return "stale"
        if item.run is not None:
            _add_event(conn, item.run, now, level, message, fields)
    return outcome


def _add_event(
    conn: Connection, run: RunView, now: datetime, level: str, message: str, fields: dict[str, Any]
) -> None:
    # The run has ended, so no worker writes its logs any more; two deliveries of one run may be
    # recorded at once, though, and the run row's lock puts their seq numbers in order.
    locked = select(runs.c.id).where(runs.c.id == run.id)
    locked = sql.for_update(conn, locked)
    if conn.execute(locked).first() is None:
        return  # the run was deleted meanwhile: its event has nowhere to go (no foreign key)
    conn.execute(
        run_logs.insert().values(
            run_id=run.id,
            seq=next_seq(conn, run_logs, run.id),
            attempt=run.attempt,
            ts=now,
            stream="event",
            level=level,
            message=message,
            fields=fields,
        )
    )


@dataclass(frozen=True, slots=True)
class DeliveryView:
    id: int
    run_id: uuid.UUID
    kind: str
    rule_id: int
    url: str
    attempts: int
    next_attempt_at: datetime
    delivered_at: datetime | None
    gave_up_at: datetime | None
    last_error: str | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        data = {name: jsonable(getattr(self, name)) for name in self.__slots__}
        data["url"] = shown_url(self.url)
        return data


def deliveries_of(engine: Engine, run_ids: Iterable[uuid.UUID]) -> list[DeliveryView]:
    """The deliveries owed for these runs, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(*(deliveries.c[name] for name in DeliveryView.__slots__))
            .where(deliveries.c.run_id.in_(list(run_ids)))
            .order_by(deliveries.c.id)
        ).all()
    return [DeliveryView(*row) for row in rows]
