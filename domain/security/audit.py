"""The audit log: who changed what, from where, with secrets masked before they are stored."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from domain.db.models import audit_logs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput
from domain.runs.views import jsonable

MASK = "***"
MAX_PAGE = 500
MAX_DETAIL_BYTES = 8192
MAX_VALUE_BYTES = 512
# Key names whose values are secrets wherever they appear (params, headers, details).
_SECRET_NAME = re.compile(
    r"secret|token|passw|authoriz|api[_-]?key|private[_-]?key|signature|credential|cookie",
    re.IGNORECASE,
)
# Values that are secrets whatever their key: our own API tokens.
TOKEN_PREFIX = "cvy_"


def mask(value: Any) -> Any:
    """`value` with every secret-looking entry replaced by ***, recursively."""
    if isinstance(value, dict):
        return {
            key: MASK if _SECRET_NAME.search(str(key)) else mask(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [mask(item) for item in value]
    if isinstance(value, str) and value.startswith(TOKEN_PREFIX):
        return MASK
    return value


def _bounded(details: dict[str, Any]) -> dict[str, Any]:
    """Details small enough for an audit row: a 1 MB params object is summarised by size."""
    if len(json.dumps(details, default=str)) <= MAX_DETAIL_BYTES:
        return details
    bounded: dict[str, Any] = {}
    for key, value in details.items():
        size = len(json.dumps(value, default=str))
        bounded[key] = value if size <= MAX_VALUE_BYTES else f"<{size} bytes omitted>"
    return bounded


def record(
    uow: UnitOfWork,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str | None,
    details: dict[str, Any] | None = None,
    ip: str | None = None,
) -> None:
    """Add an audit row inside the caller's open transaction (it commits with the change)."""
    add(
        uow.conn,
        actor=actor,
        action=action,
        target_type=target_type,
        target_id=target_id,
        details=details,
        ip=ip,
        ts=uow.clock(),
    )


def add(
    conn: Connection,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str | None,
    details: dict[str, Any] | None,
    ip: str | None,
    ts: datetime,
) -> None:
    """`record` on a bare connection, for writers that hold only the transaction's connection
    (a use case's per-batch hook): details masked and bounded the same way."""
    conn.execute(
        audit_logs.insert().values(
            ts=ts,
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            details=_bounded(mask(details)) if details else None,
            ip=ip,
        )
    )


def write(
    uow: UnitOfWork,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str | None,
    details: dict[str, Any] | None = None,
    ip: str | None = None,
) -> None:
    """Record one audit row in its own transaction (after a change a service committed)."""
    with uow:
        record(
            uow,
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            details=details,
            ip=ip,
        )
        uow.commit()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts: datetime
    actor: str
    action: str
    target_type: str
    target_id: str | None
    details: dict[str, Any] | None
    ip: str | None

    def to_dict(self) -> dict[str, Any]:
        return {key: jsonable(value) for key, value in asdict(self).items()}


@dataclass(frozen=True, slots=True)
class AuditPage:
    items: list[AuditEntry]
    next_cursor: str | None


def list_entries(
    uow: UnitOfWork,
    *,
    actor: str | None = None,
    action: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> AuditPage:
    """Newest first; `cursor` is the next_cursor of the previous page."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit: must be between 1 and {MAX_PAGE} (got {limit})", field="limit")
    stmt = select(audit_logs).order_by(audit_logs.c.id.desc()).limit(limit + 1)
    for column, value in (
        (audit_logs.c.actor, actor),
        (audit_logs.c.action, action),
        (audit_logs.c.target_type, target_type),
        (audit_logs.c.target_id, target_id),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if cursor is not None:
        stmt = stmt.where(audit_logs.c.id < _decode(cursor))
    with uow:
        rows = [AuditEntry(**row) for row in uow.conn.execute(stmt).mappings()]
    if len(rows) > limit:
        rows = rows[:limit]
        return AuditPage(rows, str(rows[-1].id))
    return AuditPage(rows, None)


def _decode(cursor: str) -> int:
    if not cursor.isdigit() or len(cursor) > 18:
        raise InvalidInput(
            "cursor: not a cursor this server issued (pass next_cursor back unchanged)",
            field="cursor",
        )
    return int(cursor)
