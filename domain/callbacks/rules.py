"""Notification rules: a signed POST to a URL when a run ends in one of the chosen states
(`conveyor notify add --on failed,timed_out --url ...`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, cast
from urllib.parse import urlsplit

from sqlalchemy import Table, select

from domain.callbacks.urls import undeliverable
from domain.db.models_platform import NotificationRule
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput, NotFound
from domain.runs.states import Status
from domain.runs.views import jsonable
from domain.security import audit

rules = cast(Table, NotificationRule.__table__)

#: what a rule may watch: the terminal states (a run is reported once, when it ends)
ENDINGS: tuple[str, ...] = tuple(
    s.value
    for s in (
        Status.SUCCEEDED,
        Status.FAILED,
        Status.CANCELLED,
        Status.TIMED_OUT,
        Status.BUDGET_EXCEEDED,
    )
)
FORMATS = ("json", "slack")


class RuleNotFound(NotFound):
    """No notification rule has this id."""


def check_url(url: str, *, field: str = "url") -> str:
    """An absolute http(s) URL a POST can be sent to (domain.callbacks.urls.undeliverable)."""
    problem = undeliverable(url)
    if problem:
        raise InvalidInput(f"{field}: {problem} (got {shown_url(url)!r})", field=field)
    return url


def shown_url(url: str) -> str:
    """The URL as logs, run events and the audit log show it: scheme and host only. Chat and
    on-call hooks carry their credential in the path or query (hooks.slack.com/services/...)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<not a URL>"
    if not parts.scheme or not host:
        return "<not a URL>"
    rest = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{host}{port}{rest}"


def parse_statuses(value: str | list[str]) -> list[str]:
    """`failed,timed_out` (or a list) → the states, checked, in a stable order."""
    items = value.split(",") if isinstance(value, str) else value
    wanted = {item.strip() for item in items if item.strip()}
    unknown = sorted(wanted - set(ENDINGS))
    if unknown or not wanted:
        raise InvalidInput(
            f"on: {unknown[0] if unknown else value!r} is not a state a run ends in; "
            f"expected some of {', '.join(ENDINGS)}",
            field="on",
        )
    return [s for s in ENDINGS if s in wanted]


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    on_statuses: list[str]
    name_pattern: str | None
    url: str
    format: str
    enabled: bool
    created_at: datetime

    def matches(self, *, status: str, name: str, finished_at: datetime) -> bool:
        """A run that ended in one of the rule's states, whose name fits its pattern, after the
        rule was made (a new rule does not report history)."""
        return (
            self.enabled
            and status in self.on_statuses
            and finished_at >= self.created_at
            and (self.name_pattern is None or fnmatchcase(name, self.name_pattern))
        )

    def to_dict(self, *, full_url: bool = True) -> dict[str, Any]:
        return {
            "id": self.id,
            "on": list(self.on_statuses),
            "name_pattern": self.name_pattern,
            "url": self.url if full_url else shown_url(self.url),
            "format": self.format,
            "enabled": self.enabled,
            "created_at": jsonable(self.created_at),
        }


def add_rule(
    uow: UnitOfWork,
    *,
    on: str | list[str],
    url: str,
    name_pattern: str | None = None,
    format: str = "json",
    actor: str,
    ip: str | None = None,
) -> Rule:
    """Store a rule; it applies to runs that end from now on."""
    statuses = parse_statuses(on)
    check_url(url)
    if format not in FORMATS:
        raise InvalidInput(f"format: expected json or slack (got {format!r})", field="format")
    if name_pattern is not None and not 1 <= len(name_pattern) <= 200:
        raise InvalidInput("name: a pattern of 1 to 200 characters", field="name")
    with uow:
        row = (
            uow.conn.execute(
                rules.insert()
                .values(
                    on_statuses=statuses,
                    name_pattern=name_pattern,
                    url=url,
                    format=format,
                    enabled=True,
                    created_at=uow.clock(),
                )
                .returning(*rules.c)
            )
            .mappings()
            .one()
        )
        rule = _rule(row)
        audit.record(
            uow,
            actor=actor,
            action="notify.add",
            target_type="notification_rule",
            target_id=str(rule.id),
            details=rule.to_dict(full_url=False),
            ip=ip,
        )
        uow.commit()
    return rule


def list_rules(uow: UnitOfWork, *, enabled_only: bool = False) -> list[Rule]:
    stmt = select(rules).order_by(rules.c.id)
    if enabled_only:
        stmt = stmt.where(rules.c.enabled.is_(True))
    with uow:
        return [_rule(row) for row in uow.conn.execute(stmt).mappings()]


def remove_rule(uow: UnitOfWork, rule_id: int, *, actor: str, ip: str | None = None) -> None:
    """Delete a rule; deliveries it already queued are still attempted."""
    with uow:
        if not uow.conn.execute(rules.delete().where(rules.c.id == rule_id)).rowcount:
            raise RuleNotFound(f"no notification rule with id {rule_id}", rule_id=rule_id)
        audit.record(
            uow,
            actor=actor,
            action="notify.remove",
            target_type="notification_rule",
            target_id=str(rule_id),
            ip=ip,
        )
        uow.commit()


def _rule(row: Any) -> Rule:
    statuses = row["on_statuses"]
    return Rule(
        id=row["id"],
        on_statuses=list(statuses) if isinstance(statuses, list | tuple) else [],
        name_pattern=row["name_pattern"],
        url=row["url"],
        format=row["format"],
        enabled=row["enabled"],
        created_at=row["created_at"],
    )
