"""Rate limits shared by all workers: so many requests and tokens per minute, per name.

`limits.define("openai", requests_per_minute=500, tokens_per_minute=200_000)` in code (written
to `rate_limits` when a worker starts), `conveyor limits define` or `PUT /api/v1/limits/{name}`.
A task takes from a limit two ways: `@task(rate_limit="openai")` takes one request as the run
starts (at its claim: a run that finds no room waits, without a worker, reason `rate:openai`),
and `ctx.acquire("openai", tokens=estimate)` inside a run, before a model call.

Where the counts live: in PostgreSQL, `rate_usage`, one row per limit and second of the
database's clock. A take locks the limit's row, reads the clock, sums the last 61 seconds
(this one and the 60 before) and, if the ask fits, adds it to this second's row: one call of
`conveyor_rate_take` (migration 0016) on PostgreSQL, the same steps in Python on SQLite. Why
not Redis: a take at a run's start is then part of the claim's transaction (no request is
counted for a claim that did not happen, none is lost with a flushed Redis, which would let
the runs exceed the provider's limit), and one locked row per take is far below what a
provider allows per minute. bench/limits.py measures it.

The window rule: any 60 s interval lies within 61 consecutive whole seconds, and a take is
granted only if those 61 seconds, it included, stay within the limit, so no 60 s window ever
holds more than the limit (the price: up to 1/61 of it goes unused). Seconds come from one
clock (the database's, read under the lock), so takes are counted in the order they happen.

`settle` corrects an estimate once the actual is known: a smaller actual gives the difference
back (in the second it was taken); a larger one is charged now, so later takes see it, but
what was already sent cannot be taken back: the limit holds for the estimates.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Table,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)

from domain.clock import utc_now
from domain.db import sql
from domain.db.capabilities import capabilities
from domain.db.driver import shared_connections
from domain.db.models import runs
from domain.db.models_platform import RateLimitRow, RateUsage
from domain.errors import ConfigurationError, InvalidInput
from domain.flow.parking import Wait, park
from domain.runs.requests import NAME_PATTERN
from domain.runs.states import Status

log = structlog.get_logger("conveyor.limits")

#: The wait reason of a run waiting for room in a limit: this prefix and the limit's name.
PREFIX = "rate:"
MAX_NAME = 100
MAX_REQUESTS_PER_MINUTE = 1_000_000_000
MAX_TOKENS_PER_MINUTE = 10**15
#: Whole seconds a take counts: the current one and the 60 before it.
WINDOW_S = 61
#: Where a definition was written last from.
SOURCES = ("code", "cli", "api")

limits = cast(Table, RateLimitRow.__table__)
usage = cast(Table, RateUsage.__table__)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A named limit: requests and/or tokens per minute (None: that one is not limited)."""

    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        for field, value, most in (
            ("requests_per_minute", self.requests_per_minute, MAX_REQUESTS_PER_MINUTE),
            ("tokens_per_minute", self.tokens_per_minute, MAX_TOKENS_PER_MINUTE),
        ):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInput(f"{field}: a whole number, got {value!r}", field=field)
            if not 1 <= value <= most:
                raise InvalidInput(f"{field}: 1 to {most:,}, got {value:,}", field=field)
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise InvalidInput(
                f"rate limit {self.name!r}: give requests_per_minute, tokens_per_minute or both",
                field="requests_per_minute",
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
        }


def check_name(name: Any, *, field: str = "name") -> str:
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= MAX_NAME
        or not re.match(NAME_PATTERN, name)
    ):
        raise InvalidInput(
            f"{field}: a rate limit name of 1 to {MAX_NAME} letters, digits, _ . : -, got {name!r}",
            field=field,
        )
    return name


# -- defined in code ----------------------------------------------------------------------

_CODE: dict[str, RateLimit] = {}
_CODE_LOCK = threading.Lock()


def define(
    name: str, *, requests_per_minute: int | None = None, tokens_per_minute: int | None = None
) -> RateLimit:
    """Define a limit in code (at import, beside the tasks that use it). Each worker writes its
    code's limits to the database as it starts; a bad value is a ConfigurationError here."""
    try:
        limit = RateLimit(name, requests_per_minute, tokens_per_minute)
    except InvalidInput as exc:
        raise ConfigurationError(str(exc), field=exc.field) from None
    with _CODE_LOCK:
        known = _CODE.get(name)
        if known is not None and known != limit:
            raise ConfigurationError(
                f"rate limit {name!r} is already defined with other values ({known.to_dict()})",
                field="name",
            )
        _CODE[name] = limit
    return limit


def defined_in_code() -> list[RateLimit]:
    with _CODE_LOCK:
        return [_CODE[name] for name in sorted(_CODE)]


def forget_code_definitions() -> None:
    """For tests: the process's code-defined limits, emptied."""
    with _CODE_LOCK:
        _CODE.clear()


# -- stored definitions ---------------------------------------------------------------------


def save(conn: Connection, limit: RateLimit, *, defined_in: str, now: datetime) -> None:
    """Create or change a limit (what was counted in its window stays counted)."""
    if defined_in not in SOURCES:
        raise ValueError(f"defined_in: one of {SOURCES}, got {defined_in!r}")
    values = {
        "requests_per_minute": limit.requests_per_minute,
        "tokens_per_minute": limit.tokens_per_minute,
        "defined_in": defined_in,
        "updated_at": now,
    }
    stmt = sql.insert(conn, limits).values(name=limit.name, **values)
    conn.execute(stmt.on_conflict_do_update(index_elements=[limits.c.name], set_=values))


def remove(conn: Connection, name: str) -> bool:
    """Delete a limit and its counts; False if there was none. Runs that name it then start
    with a warning, and `ctx.acquire` of it fails, until it is defined again."""
    return conn.execute(delete(limits).where(limits.c.name == name)).rowcount > 0


def sync(conn: Connection, *, now: datetime) -> list[str]:
    """Write this process's code-defined limits (as a worker starts). A limit last set by the
    CLI or the API is left as the operator set it, with a warning if the code says otherwise.
    Returns the names written."""
    written = []
    for limit in defined_in_code():
        row = conn.execute(select(limits).where(limits.c.name == limit.name)).first()
        if row is not None and as_limit(row) == limit:
            continue
        if row is not None and row.defined_in != "code":
            log.warning(
                "rate_limit.kept",
                name=limit.name,
                code=limit.to_dict(),
                stored=as_limit(row).to_dict(),
                defined_in=row.defined_in,
                hint="set by the operator; `conveyor limits define` changes it",
            )
            continue
        save(conn, limit, defined_in="code", now=now)
        written.append(limit.name)
    return written


def as_limit(row: Any) -> RateLimit:
    return RateLimit(row.name, row.requests_per_minute, row.tokens_per_minute)


def get(conn: Connection, name: str) -> RateLimit | None:
    row = conn.execute(select(limits).where(limits.c.name == name)).first()
    return None if row is None else as_limit(row)


def check_known(conn: Connection, names: Iterable[str | None]) -> None:
    """At enqueue: every rate limit a run names is defined (in code here, or stored)."""
    wanted = {name for name in names if name is not None}
    code = {limit.name for limit in defined_in_code()}
    missing = wanted - code
    if not missing:
        return
    stored = set(conn.execute(select(limits.c.name).where(limits.c.name.in_(missing))).scalars())
    missing -= stored
    if missing:
        known = sorted(code | set(conn.execute(select(limits.c.name)).scalars()))
        raise InvalidInput(
            f"rate_limit: no rate limit named {', '.join(map(repr, sorted(missing)))} "
            f"(defined: {', '.join(known) or 'none'}; define it with limits.define, "
            "`conveyor limits define` or PUT /api/v1/limits/{name})",
            field="rate_limit",
        )


# -- taking -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Taken:
    """What a take got. `granted`: counted in `second` (Unix seconds). Otherwise `wait_s` says
    when enough of the window will have passed for it to fit, or -1: it never fits (the ask is
    above the limit itself). `limit` is None when no limit of that name exists."""

    granted: bool
    second: int
    wait_s: float
    limit: RateLimit | None


def take(
    conn: Connection,
    name: str,
    *,
    requests: int = 1,
    tokens: int = 0,
    now: datetime | None = None,
) -> Taken:
    """Take `requests` and `tokens` from the limit if its window has room, in the caller's
    transaction (the limit's row stays locked until it ends). `now`: for tests; otherwise the
    database's clock, read under the lock."""
    if capabilities(conn).stored_functions:
        call = text(
            "SELECT found, granted, second, wait_s, rpm, tpm "
            "FROM conveyor_rate_take(:name, :requests, :tokens, :now)"
        ).bindparams(bindparam("now", type_=DateTime(timezone=True)))
        row = conn.execute(
            call, {"name": name, "requests": requests, "tokens": tokens, "now": now}
        ).one()
        if not row.found:
            return Taken(False, 0, 0.0, None)
        return Taken(row.granted, row.second, row.wait_s, RateLimit(name, row.rpm, row.tpm))
    return _take_here(conn, name, requests, tokens, now)


def take_alone(engine: Engine, name: str, *, requests: int = 1, tokens: int = 0) -> Taken:
    """`take` in a transaction of its own (ctx.acquire). On PostgreSQL that is one statement in
    autocommit that also turns synchronous_commit off for its own commit: the take does not
    wait for the WAL to reach the disk (half of its time here, bench/limits.py). What that
    risks: a PostgreSQL crash may forget the takes of its last fraction of a second (at most
    three wal_writer_delay, 600 ms by default), which the runs may then take again; a crashed
    worker or a restarted Redis forgets nothing. A run's start request is not taken this way:
    it commits with the claim."""
    if not capabilities(engine).stored_functions:
        with engine.begin() as conn:
            return take(conn, name, requests=requests, tokens=tokens)
    # Prepared, on a driver connection of this thread (domain/db/driver.py): no pool checkout
    # and no statement building per take.
    args = {"name": name, "requests": requests, "tokens": tokens}
    with shared_connections(engine).connection() as raw:
        row = raw.execute(_TAKE_ALONE_SQL, args, prepare=True).fetchone()
    assert row is not None  # the function returns one row
    found, granted, second, wait_s, rpm, tpm = row
    if not found:
        return Taken(False, 0, 0.0, None)
    return Taken(granted, second, wait_s, RateLimit(name, rpm, tpm))


# set_config is local to this statement's transaction: in effect when it commits.
_TAKE_ALONE_SQL = (
    "SELECT t.found, t.granted, t.second, t.wait_s, t.rpm, t.tpm "
    "FROM conveyor_rate_take(%(name)s, %(requests)s, %(tokens)s, NULL) AS t, "
    "set_config('synchronous_commit', 'off', true)"
)


def _take_here(
    conn: Connection, name: str, requests: int, tokens: int, now: datetime | None
) -> Taken:
    """`take`, step by step (what conveyor_rate_take does on PostgreSQL in one call)."""
    row = conn.execute(sql.for_update(conn, select(limits).where(limits.c.name == name))).first()
    if row is None:
        return Taken(False, 0, 0.0, None)
    limit = as_limit(row)
    t = (now or utc_now()).timestamp()
    s = math.floor(t)
    buckets = conn.execute(
        select(usage.c.second, usage.c.requests, usage.c.tokens)
        .where(usage.c.limit_name == name, usage.c.second > s - WINDOW_S)
        .order_by(usage.c.second)
    ).all()
    used_r = sum(b.requests for b in buckets)
    used_t = sum(b.tokens for b in buckets)
    rpm, tpm = limit.requests_per_minute, limit.tokens_per_minute
    if (rpm is None or used_r + requests <= rpm) and (tpm is None or used_t + tokens <= tpm):
        _count(conn, name, s, requests, tokens)
        conn.execute(
            delete(usage).where(usage.c.limit_name == name, usage.c.second <= s - WINDOW_S)
        )
        return Taken(True, s, 0.0, limit)
    if (rpm is not None and requests > rpm) or (tpm is not None and tokens > tpm):
        return Taken(False, s, -1.0, limit)
    need_r = 0 if rpm is None else used_r + requests - rpm
    need_t = 0 if tpm is None else used_t + tokens - tpm
    freed_r = freed_t = 0
    for b in buckets:
        freed_r += b.requests
        freed_t += b.tokens
        if freed_r >= need_r and freed_t >= need_t:
            return Taken(False, s, max(b.second + WINDOW_S - t, 0.0), limit)
    return Taken(False, s, float(WINDOW_S), limit)


def settle(
    conn: Connection,
    name: str,
    second: int,
    *,
    tokens: int,
    now: datetime | None = None,
) -> None:
    """Correct a grant taken in `second` by `tokens`: the actual minus the estimate. Less is
    given back in that second (while it is in the window); more is charged in the current
    one, so that later takes see it."""
    if tokens < 0:
        conn.execute(
            update(usage)
            .where(usage.c.limit_name == name, usage.c.second == second)
            .values(tokens=sql.greatest(conn, usage.c.tokens + tokens, 0))
        )
    elif tokens > 0 and get(conn, name) is not None:
        _count(conn, name, math.floor((now or utc_now()).timestamp()), 0, tokens)


def _count(conn: Connection, name: str, second: int, requests: int, tokens: int) -> None:
    """Add to what the limit gave out in `second`."""
    stmt = sql.insert(conn, usage).values(
        limit_name=name, second=second, requests=requests, tokens=tokens
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[usage.c.limit_name, usage.c.second],
            set_={
                "requests": usage.c.requests + stmt.excluded.requests,
                "tokens": usage.c.tokens + stmt.excluded.tokens,
            },
        )
    )


# -- at a run's start -------------------------------------------------------------------------

#: The gate's answer for a run whose start request was granted.
PASSED = "passed"


def gate(conn: Connection, run_id: Any, claimable: Any, *, now: datetime) -> Wait | str | None:
    """For a claimable run: None if it names no rate limit, PASSED once it took its one
    request; otherwise the run is written waiting for the limit, here, and the Wait says so.
    A limit that no longer exists lets the run start, with a warning."""
    query = select(runs.c.rate_limit, runs.c.status, runs.c.created_at).where(
        runs.c.id == run_id, claimable
    )
    row = conn.execute(query).first()
    if row is None or row.rate_limit is None:
        return None
    # Its row is locked before the take: a second delivery of the same run, claiming at the
    # same moment, waits here and then finds it no longer claimable, instead of taking a
    # request for a claim that cannot happen.
    row = conn.execute(sql.for_update(conn, query)).first()
    if row is None:
        return None
    name = row.rate_limit
    taken = take(conn, name)
    if taken.granted:
        return PASSED
    if taken.limit is None:
        log.warning("rate_limit.unknown", run_id=str(run_id), name=name, hint="run started")
        return PASSED
    # Those already waiting for this limit go first: each wakes a little after the one
    # before it, rather than all at the same instant.
    ahead = conn.execute(
        select(func.count()).where(
            runs.c.status == Status.WAITING,
            runs.c.wait_reason == PREFIX + name,
            runs.c.id != run_id,
            runs.c.created_at < row.created_at,
        )
    ).scalar_one()
    rpm = taken.limit.requests_per_minute
    spacing = 60.0 / rpm if rpm else 0.05
    wake_at = now + timedelta(seconds=max(taken.wait_s, 0.0) + ahead * spacing)
    turn = park(
        conn,
        run_id,
        claimable,
        opened=row.status == Status.WAITING,
        reason=PREFIX + name,
        wake_at=wake_at,
    )
    detail = (
        f"waits for rate limit {name!r}: no room in the last minute, "
        f"{ahead} waiting ahead, next look at {wake_at:%H:%M:%S} UTC"
    )
    return Wait(PREFIX + name, wake_at, detail, turn_queue=turn)
