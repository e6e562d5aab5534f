"""What operators do with limits (`conveyor limits`, /api/v1/limits): see them all with what
they hold and who waits, define a rate limit, remove one. Changes are audited."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, func, or_, select

from domain.clock import utc_now
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import NotFound
from domain.flow import concurrency, rates
from domain.flow.rates import RateLimit
from domain.runs.states import Status
from domain.security import audit

#: Keyed concurrency has one row per key in use; listings show at most this many, busiest first.
MAX_KEYS_SHOWN = 500


class RateLimitNotFound(NotFound):
    """No rate limit has that name."""


@dataclass(frozen=True, slots=True)
class Usage:
    """A limit as `conveyor limits list` and GET /api/v1/limits show it."""

    limit: RateLimit
    defined_in: str
    updated_at: datetime
    requests_used: int
    tokens_used: int
    #: Runs waiting to start for it (reason rate:<name>), and running runs waiting in
    #: ctx.acquire for it.
    waiting: int

    @property
    def requests_left(self) -> int | None:
        rpm = self.limit.requests_per_minute
        return None if rpm is None else max(rpm - self.requests_used, 0)

    @property
    def tokens_left(self) -> int | None:
        tpm = self.limit.tokens_per_minute
        return None if tpm is None else max(tpm - self.tokens_used, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.limit.to_dict(),
            "defined_in": self.defined_in,
            "updated_at": self.updated_at,
            "requests_used": self.requests_used,
            "tokens_used": self.tokens_used,
            "requests_left": self.requests_left,
            "tokens_left": self.tokens_left,
            "waiting": self.waiting,
        }


def usage_of(
    conn: Connection, *, now: datetime | None = None, name: str | None = None
) -> list[Usage]:
    """Every stored limit (or the one named) with what its window holds now and how many runs
    wait for it."""
    s = math.floor((now or utc_now()).timestamp())
    used = {
        r.limit_name: (r.requests, r.tokens)
        for r in conn.execute(
            select(
                rates.usage.c.limit_name,
                func.sum(rates.usage.c.requests).label("requests"),
                func.sum(rates.usage.c.tokens).label("tokens"),
            )
            .where(rates.usage.c.second > s - rates.WINDOW_S)
            .group_by(rates.usage.c.limit_name)
        )
    }
    waiting: dict[str, int] = dict(
        conn.execute(
            select(runs.c.wait_reason, func.count())
            .where(
                runs.c.status.in_((Status.WAITING, Status.RUNNING)),
                runs.c.wait_reason.like(rates.PREFIX + "%"),
            )
            .group_by(runs.c.wait_reason)
        ).all()
    )
    out = []
    stored = select(rates.limits).order_by(rates.limits.c.name)
    if name is not None:
        stored = stored.where(rates.limits.c.name == name)
    for row in conn.execute(stored):
        r, k = used.get(row.name, (0, 0))
        out.append(
            Usage(
                rates.as_limit(row),
                row.defined_in,
                row.updated_at,
                int(r or 0),
                int(k or 0),
                int(waiting.get(rates.PREFIX + row.name, 0)),
            )
        )
    return out


def overview(uow: UnitOfWork, *, now: datetime) -> dict[str, Any]:
    """Every rate limit (its limits, what its window holds, what is left, runs waiting) and
    every concurrency key in use (running and waiting), as the CLI and API show them."""
    with uow:
        conn = uow.conn
        return {
            "rate_limits": [u.to_dict() for u in usage_of(conn, now=now)],
            "concurrency": keys_in_use(conn, now=now),
        }


def keys_in_use(conn: Connection, *, now: datetime) -> list[dict[str, Any]]:
    """Concurrency keys with a run holding or waiting for them: key, max, running, waiting."""
    holding = (runs.c.status == Status.RUNNING) & (runs.c.lease_expires_at >= now)
    waiting = (runs.c.status == Status.WAITING) & (
        runs.c.wait_reason == concurrency.PREFIX + runs.c.concurrency_key
    )
    rows = conn.execute(
        select(
            runs.c.concurrency_key,
            func.max(runs.c.concurrency_max).label("max"),
            func.sum(case((holding, 1), else_=0)).label("running"),
            func.sum(case((waiting, 1), else_=0)).label("waiting"),
        )
        .where(runs.c.concurrency_key.is_not(None), or_(holding, waiting))
        .group_by(runs.c.concurrency_key)
        .order_by(func.count().desc(), runs.c.concurrency_key)
        .limit(MAX_KEYS_SHOWN)
    ).all()
    return [
        {"key": r.concurrency_key, "max": r.max or 1, "running": r.running, "waiting": r.waiting}
        for r in rows
    ]


#: Concurrency keys each get their own gauge series only among the busiest this many; the rest
#: are summed into one (a key per repository branch would otherwise flood Prometheus).
MAX_KEYS_MEASURED = 20
OTHER_KEYS = "(other keys)"


def waiting_per_limit(uow: UnitOfWork, *, now: datetime) -> list[tuple[str, str, int]]:
    """(kind, name, runs waiting) per rate limit (all of them, 0 included) and per concurrency
    key with waiters (the busiest MAX_KEYS_MEASURED, then OTHER_KEYS), for Prometheus."""
    shown = overview(uow, now=now)
    out = [("rate", r["name"], r["waiting"]) for r in shown["rate_limits"]]
    keys = sorted(
        (k for k in shown["concurrency"] if k["waiting"]), key=lambda k: (-k["waiting"], k["key"])
    )
    out += [("concurrency", k["key"], k["waiting"]) for k in keys[:MAX_KEYS_MEASURED]]
    rest = sum(k["waiting"] for k in keys[MAX_KEYS_MEASURED:])
    if rest:
        out.append(("concurrency", OTHER_KEYS, rest))
    return out


def define(
    uow: UnitOfWork,
    limit: RateLimit,
    *,
    defined_in: str,
    actor: str,
    now: datetime,
    ip: str | None = None,
) -> dict[str, Any]:
    """Create or change a rate limit (a code definition of it then stays as the operator set
    it, see rates.sync); returns it as listed."""
    with uow:
        rates.save(uow.conn, limit, defined_in=defined_in, now=now)
        audit.record(
            uow,
            actor=actor,
            action="rate_limit.define",
            target_type="rate_limit",
            target_id=limit.name,
            details=limit.to_dict(),
            ip=ip,
        )
        (shown,) = usage_of(uow.conn, now=now, name=limit.name)
        uow.commit()
    return shown.to_dict()


def remove(uow: UnitOfWork, name: str, *, actor: str, ip: str | None = None) -> None:
    """Delete a rate limit and its counts; RateLimitNotFound if there is none."""
    with uow:
        if not rates.remove(uow.conn, name):
            raise RateLimitNotFound(f"no rate limit named {name[:200]!r}", name=name)
        audit.record(
            uow,
            actor=actor,
            action="rate_limit.remove",
            target_type="rate_limit",
            target_id=name,
            ip=ip,
        )
        uow.commit()
