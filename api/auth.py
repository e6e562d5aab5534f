"""Bearer-token authentication with roles, and a brake on repeated failures per address and per
token prefix that never holds back a token that authenticates."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Annotated

import anyio
import structlog
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from api.errors import RateLimited
from api.options import ApiOptions
from api.state import get_state
from domain.security import tokens as auth
from domain.security.tokens import Principal, Unauthorized

log = structlog.get_logger("conveyor.api.auth")

DEV_PRINCIPAL = Principal(name="dev", role="admin")
MAX_TRACKED = 10_000
#: "cvy_" and 8 random characters: variations of one token share it, different tokens do not.
PREFIX_CHARS = 12


class FailedAuthLimiter:
    """Failed authentications, counted per client address and per token prefix (the first
    PREFIX_CHARS characters presented, so guesses at one token from many addresses add up too).

    After `slow_after` failures of one address or prefix within `window_s`, each further failure
    is answered after a growing delay; at `block_after` that address or prefix is blocked for
    `block_s`: its failures are answered 429 after the longest delay. Only failures meet the
    brake: every request is authenticated first, and a token that authenticates is served at
    once however many failures its address or prefix has, and leaves their count alone (a
    caller holding one valid token cannot use it to reset its guesses at another). Addresses are
    the connecting ones, or X-Forwarded-For from CONVEYOR_TRUSTED_PROXIES only (`conveyor api`
    configures uvicorn so). In memory and per process: enough to make guessing slow and loud,
    not a cluster-wide ban.
    """

    def __init__(self, options: ApiOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self.slow_after = options.auth_slow_after
        self.block_after = options.auth_block_after
        self.window_s = options.auth_window_s
        self.block_s = options.auth_block_s
        self.max_delay_s = options.auth_max_delay_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}

    @staticmethod
    def sources(ip: str, token: str | None) -> dict[str, str]:
        """The counters a failure with `token` from `ip` adds to, by kind. A prefix is kept only
        as a short hash: it may be the start of a real token."""
        found = {"address": ip}
        if token:
            prefix = token[:PREFIX_CHARS].encode("utf-8", "surrogatepass")
            found["token"] = hashlib.sha256(prefix).hexdigest()[:16]
        return found

    def blocked(self, ip: str, token: str | None) -> RateLimited | None:
        """The 429 for a failure from `ip` with `token` while either of them is blocked."""
        now = self.clock()
        for kind, key in self.sources(ip, token).items():
            until = self._blocked_until.get(f"{kind} {key}")
            if until is None:
                continue
            remaining = until - now
            if remaining <= 0:
                del self._blocked_until[f"{kind} {key}"]
                continue
            whose = "from this address" if kind == "address" else "with this token"
            return RateLimited(
                f"too many failed authentication attempts {whose}; "
                f"try again in {math.ceil(remaining)}s",
                retry_after_s=math.ceil(remaining),
            )
        return None

    def failed(self, ip: str, token: str | None) -> float:
        """Count a failure; returns how long to delay its answer."""
        now = self.clock()
        if len(self._failures) >= MAX_TRACKED:
            self._forget_old(now)
        sources = self.sources(ip, token)
        counts: dict[str, int] = {}
        for kind, key in sources.items():
            failures = self._failures.setdefault(f"{kind} {key}", deque())
            failures.append(now)
            while failures and failures[0] < now - self.window_s:
                failures.popleft()
            counts[kind] = len(failures)
            if len(failures) >= self.block_after:
                self._blocked_until[f"{kind} {key}"] = now + self.block_s
                del self._failures[f"{kind} {key}"]
        fields = {"ip": ip, "token_prefix_hash": sources.get("token"), "failures": counts}
        worst = max(counts.values())
        if worst >= self.block_after:
            by = [kind for kind, count in counts.items() if count >= self.block_after]
            log.warning("auth.blocked", blocked=by, block_s=self.block_s, **fields)
            return 0.0
        if worst > self.slow_after:
            delay = min(self.max_delay_s, 0.05 * 2.0 ** (worst - self.slow_after))
            log.warning("auth.slowed", delay_s=delay, **fields)
            return delay
        log.info("auth.failed", **fields)
        return 0.0

    def _forget_old(self, now: float) -> None:
        # Bounded memory under a spray of addresses: drop those with no recent failure.
        for key in [k for k, f in self._failures.items() if not f or f[-1] < now - self.window_s]:
            del self._failures[key]
        for key in [k for k, until in self._blocked_until.items() if until <= now]:
            del self._blocked_until[key]


class TokenCache:
    """Tokens that authenticated in the last `ttl_s`, keyed by their hash (the token itself is
    never kept), so a busy client costs one database lookup per `ttl_s` instead of one per
    request. Only successes are cached: an unknown token always goes to the database (and to
    the failure limiter). The price is that a token revoked by another process is still
    accepted here for up to `ttl_s`; a revocation through this process clears the cache."""

    def __init__(
        self, ttl_s: float, clock: Callable[[], float] = time.monotonic, max_entries: int = 1000
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, token_hash: str) -> Principal | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        expires, who = entry
        if self.clock() >= expires:
            self._entries.pop(token_hash, None)
            return None
        return who

    def put(self, token_hash: str, who: Principal) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # many distinct tokens is rare; start over rather than sort
        self._entries[token_hash] = (self.clock() + self.ttl_s, who)

    def clear(self) -> None:
        self._entries.clear()


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def principal(request: Request) -> Principal:
    """Who is calling; 401 for a missing, unknown or revoked token, 429 while blocked."""
    return await principal_for(request, bearer_token(request))


async def principal_for(request: Request, token: str | None) -> Principal:
    """Who presents `token` (from a header, or the dashboard's cookie): the one check every
    caller goes through, with its cache and its brake on failures. With auth disabled (dev
    mode) every local caller is an admin, whatever it presents."""
    state = get_state(request)
    ip = client_ip(request)
    if state.auth_disabled:
        if not is_loopback(ip):
            raise auth.Forbidden("authentication is disabled (dev mode): only local clients")
        return DEV_PRINCIPAL
    cache: TokenCache = request.app.state.tokens
    digest = auth.hash_token(token) if token is not None else ""
    cached = cache.get(digest)
    if cached is not None:
        return cached
    try:
        if token is None:
            raise Unauthorized()
        found = await run_in_threadpool(
            auth.authenticate, state.uow(), token, touch_every_s=state.options.token_touch_s
        )
    except Unauthorized:
        # Only now the brake: a blocked address or prefix still gets its valid tokens served.
        limiter: FailedAuthLimiter = request.app.state.limiter
        refusal = limiter.blocked(ip, token)
        delay = limiter.max_delay_s if refusal else limiter.failed(ip, token)
        if delay:
            await anyio.sleep(delay)
        if refusal is not None:
            raise refusal from None
        raise
    cache.put(digest, found)
    return found


def requires(role: str) -> Callable[..., Awaitable[Principal]]:
    # One dependency, not one on top of another: FastAPI resolves each level on every
    # request (cache keys, signature walk), and nothing else depends on principal alone.
    async def dependency(request: Request) -> Principal:
        who = await principal(request)
        auth.require(who, role)
        return who

    dependency.role = role  # type: ignore[attr-defined]  # the OpenAPI document reads it
    return dependency


Reader = Annotated[Principal, Depends(requires("readonly"))]
Writer = Annotated[Principal, Depends(requires("write"))]
Admin = Annotated[Principal, Depends(requires("admin"))]
