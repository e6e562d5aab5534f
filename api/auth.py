"""Bearer-token authentication with roles, and a brake on repeated failures per address."""

from __future__ import annotations

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
from api.state import ApiOptions, get_state
from domain import auth
from domain.auth import Principal, Unauthorized

log = structlog.get_logger("conveyor.api.auth")

DEV_PRINCIPAL = Principal(name="dev", role="admin")
MAX_TRACKED = 10_000


class FailedAuthLimiter:
    """Per client address: after `slow_after` failures within `window_s` each further failure
    is answered after a growing delay; at `block_after` the address is refused for `block_s`.
    In memory and per process: enough to make guessing slow, not a cluster-wide ban."""

    def __init__(self, options: ApiOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self.slow_after = options.auth_slow_after
        self.block_after = options.auth_block_after
        self.window_s = options.auth_window_s
        self.block_s = options.auth_block_s
        self.max_delay_s = options.auth_max_delay_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}

    def check(self, ip: str) -> None:
        """RateLimited while `ip` is blocked."""
        until = self._blocked_until.get(ip)
        if until is None:
            return
        remaining = until - self.clock()
        if remaining > 0:
            raise RateLimited(
                "too many failed authentication attempts from this address; "
                f"try again in {math.ceil(remaining)}s",
                retry_after_s=math.ceil(remaining),
            )
        del self._blocked_until[ip]

    def failed(self, ip: str) -> float:
        """Count a failure; returns how long to delay the answer."""
        now = self.clock()
        if len(self._failures) >= MAX_TRACKED:
            self._forget_old(now)
        failures = self._failures.setdefault(ip, deque())
        failures.append(now)
        while failures and failures[0] < now - self.window_s:
            failures.popleft()
        count = len(failures)
        if count >= self.block_after:
            self._blocked_until[ip] = now + self.block_s
            del self._failures[ip]
            log.warning("auth.blocked", ip=ip, failures=count, block_s=self.block_s)
            return 0.0
        if count > self.slow_after:
            delay = min(self.max_delay_s, 0.05 * 2.0 ** (count - self.slow_after))
            log.warning("auth.slowed", ip=ip, failures=count, delay_s=delay)
            return delay
        log.info("auth.failed", ip=ip, failures=count)
        return 0.0

    def succeeded(self, ip: str) -> None:
        self._failures.pop(ip, None)

    def _forget_old(self, now: float) -> None:
        # Bounded memory under a spray of addresses: drop those with no recent failure.
        for ip in [ip for ip, f in self._failures.items() if not f or f[-1] < now - self.window_s]:
            del self._failures[ip]
        for ip in [ip for ip, until in self._blocked_until.items() if until <= now]:
            del self._blocked_until[ip]


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
    state = get_state(request)
    ip = client_ip(request)
    if state.auth_disabled:
        if not is_loopback(ip):
            raise auth.Forbidden("authentication is disabled (dev mode): only local clients")
        return DEV_PRINCIPAL
    limiter: FailedAuthLimiter = request.app.state.limiter
    limiter.check(ip)
    token = bearer_token(request)
    cache: TokenCache = request.app.state.tokens
    digest = auth.hash_token(token) if token is not None else ""
    cached = cache.get(digest)
    if cached is not None:
        limiter.succeeded(ip)
        return cached
    try:
        if token is None:
            raise Unauthorized()
        found = await run_in_threadpool(
            auth.authenticate, state.uow(), token, touch_every_s=state.options.token_touch_s
        )
    except Unauthorized:
        delay = limiter.failed(ip)
        if delay:
            await anyio.sleep(delay)
        raise
    limiter.succeeded(ip)
    cache.put(digest, found)
    return found


def requires(role: str) -> Callable[..., Awaitable[Principal]]:
    # One dependency, not one on top of another: FastAPI resolves each level on every
    # request (cache keys, signature walk), and nothing else depends on principal alone.
    async def dependency(request: Request) -> Principal:
        who = await principal(request)
        auth.require(who, role)
        return who

    return dependency


Reader = Annotated[Principal, Depends(requires("readonly"))]
Writer = Annotated[Principal, Depends(requires("write"))]
Admin = Annotated[Principal, Depends(requires("admin"))]
