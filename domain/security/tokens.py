"""API tokens with roles: issued once, stored only as a hash, checked on every request."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, or_, select, update
from sqlalchemy.exc import IntegrityError

from domain.db.models_platform import ApiToken
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, ConveyorError, InvalidInput, NotFound
from domain.runs.requests import NAME_PATTERN
from domain.runs.views import jsonable
from domain.security import audit

api_tokens = cast(Table, ApiToken.__table__)

ROLES: tuple[str, ...] = ("readonly", "write", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}
TOKEN_PREFIX = audit.TOKEN_PREFIX
MAX_TOKEN_CHARS = 512


class Unauthorized(ConveyorError):
    """Authentication required: send `Authorization: Bearer <token>` with a valid token."""


class Forbidden(ConveyorError):
    """This token's role does not allow this."""


class TokenNotFound(NotFound):
    """No API token has this name."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's name (the audit actor) and its role."""

    name: str
    role: str

    def allows(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]


@dataclass(frozen=True, slots=True)
class TokenView:
    id: int
    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {key: jsonable(value) for key, value in asdict(self).items()}


def hash_token(token: str) -> str:
    """SHA-256 is enough here: tokens carry 256 random bits, so there is nothing to brute-force
    that a slow hash would protect (unlike passwords)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_role(role: str) -> str:
    if role not in _RANK:
        raise InvalidInput(f"role: expected one of {', '.join(ROLES)} (got {role!r})", field="role")
    return role


def check_name(name: str, *, what: str = "name") -> str:
    if not name or len(name) > 200 or not re.match(NAME_PATTERN, name):
        raise InvalidInput(
            f"{what}: {name!r} is not a valid name; use letters, digits, _ . : - (max 200)",
            field=what,
        )
    return name


def require(principal: Principal, role: str) -> None:
    """Forbidden unless `principal`'s role is at least `role` (readonly < write < admin)."""
    if not principal.allows(role):
        raise Forbidden(
            f"token {principal.name!r} has role {principal.role}; this needs {role}",
            role=role,
        )


def create_token(
    uow: UnitOfWork, name: str, role: str, *, actor: str, ip: str | None = None
) -> tuple[TokenView, str]:
    """A new token: the view and the token itself, which is shown once and never stored."""
    check_name(name)
    check_role(role)
    token = new_token()
    with uow:
        now = uow.clock()
        try:
            row = (
                uow.conn.execute(
                    api_tokens.insert()
                    .values(name=name, token_hash=hash_token(token), role=role, created_at=now)
                    .returning(*api_tokens.c)
                )
                .mappings()
                .one()
            )
        except IntegrityError:
            raise Conflict(
                f"a token named {name!r} already exists (revoked ones keep their name); "
                "pick another name",
                name=name,
            ) from None
        audit.record(
            uow,
            actor=actor,
            action="token.create",
            target_type="token",
            target_id=name,
            details={"role": role},
            ip=ip,
        )
        uow.commit()
    return _view(row), token


def list_tokens(uow: UnitOfWork) -> list[TokenView]:
    with uow:
        rows = uow.conn.execute(select(api_tokens).order_by(api_tokens.c.name)).mappings()
        return [_view(row) for row in rows]


def revoke_token(uow: UnitOfWork, name: str, *, actor: str, ip: str | None = None) -> TokenView:
    """Revoke at once; revoking a revoked token is a Conflict that says when it was."""
    with uow:
        now = uow.clock()
        row = (
            uow.conn.execute(
                update(api_tokens)
                .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
                .returning(*api_tokens.c)
            )
            .mappings()
            .first()
        )
        if row is None:
            existing = (
                uow.conn.execute(select(api_tokens).where(api_tokens.c.name == name))
                .mappings()
                .first()
            )
            if existing is None:
                raise TokenNotFound(f"no API token named {name!r}", name=name)
            raise Conflict(
                f"token {name!r} was already revoked at {existing['revoked_at']:%Y-%m-%d %H:%M}Z"
            )
        audit.record(
            uow, actor=actor, action="token.revoke", target_type="token", target_id=name, ip=ip
        )
        uow.commit()
    return _view(row)


def authenticate(uow: UnitOfWork, token: str, *, touch_every_s: float = 60.0) -> Principal:
    """The principal for `token`; Unauthorized when it is unknown or revoked.

    `last_used_at` is written at most once per `touch_every_s` per token, so a busy client
    does not turn every read into a write.
    """
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized("invalid or revoked API token")
    with uow:
        row = uow.conn.execute(
            select(
                api_tokens.c.id, api_tokens.c.name, api_tokens.c.role, api_tokens.c.last_used_at
            ).where(api_tokens.c.token_hash == hash_token(token), api_tokens.c.revoked_at.is_(None))
        ).first()
        if row is None:
            raise Unauthorized("invalid or revoked API token")
        now = uow.clock()
        stale = now - timedelta(seconds=touch_every_s)
        if row.last_used_at is None or row.last_used_at < stale:
            # Conditional, so concurrent requests of one token write once between them.
            uow.conn.execute(
                update(api_tokens)
                .where(
                    api_tokens.c.id == row.id,
                    or_(api_tokens.c.last_used_at.is_(None), api_tokens.c.last_used_at < stale),
                )
                .values(last_used_at=now)
            )
            uow.commit()
    return Principal(name=row.name, role=row.role)


def _view(row: Any) -> TokenView:
    return TokenView(
        id=row["id"],
        name=row["name"],
        role=row["role"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )
