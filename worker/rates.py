"""`ctx.acquire`: take room in a shared rate limit before a model call, waiting for it.

TaskContext inherits it from here. A take is one short transaction (domain/flow/rates.py);
while the limit has no room the run keeps its worker and says what it waits for (the run's
`wait_reason` is `rate:<name>`, shown by the API and CLI), sleeping until enough of the window
has passed, woken early by a cancel, and giving up with WaitTimeout after `timeout`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, update

from domain.db.models import runs
from domain.errors import InvalidInput, WaitTimeout
from domain.flow import rates
from domain.runs import fence
from domain.runs.requests import parse_duration
from domain.runs.store import Claim

#: How long ctx.acquire waits for room unless told.
DEFAULT_TIMEOUT = timedelta(minutes=5)
#: Waiters of one limit wake spread over up to this much, so they do not all ask at once.
JITTER_S = 0.25


@dataclass(slots=True)
class Grant:
    """Room taken in a limit: `tokens` (the estimate) and `requests`, counted in `second`.
    `settle(actual)` corrects the estimate; `ctx.cost(tokens_in=, tokens_out=)` settles the
    oldest grant still open, so most code never calls it."""

    name: str
    second: int
    requests: int
    tokens: int
    _engine: Engine = field(repr=False)
    settled: bool = False

    def settle(self, tokens: int) -> None:
        """The call used `tokens` in all: give back what the estimate had over, or charge
        what it had under. Once; later calls do nothing."""
        if self.settled:
            return
        tokens = _count(tokens, "tokens", rates.MAX_TOKENS_PER_MINUTE)
        self.settled = True
        if tokens != self.tokens:
            with self._engine.begin() as conn:
                rates.settle(conn, self.name, self.second, tokens=tokens - self.tokens)


def _count(value: object, name: str, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise InvalidInput(f"{name}: a whole number from 0 to {most:,}, got {value!r}", field=name)
    return value


class RateLimits:
    """The rate-limit half of TaskContext (worker/context.py), which sets these attributes."""

    _claim: Claim
    _engine: Engine
    _clock: Callable[[], datetime]
    _stop: threading.Event
    _grants: list[Grant]
    check_cancel: Callable[[], None]

    def acquire(
        self,
        name: str,
        *,
        tokens: int = 0,
        requests: int = 1,
        timeout: str | float | timedelta = DEFAULT_TIMEOUT,
    ) -> Grant:
        """Take `requests` and an estimate of `tokens` from the rate limit `name`, shared by
        every worker, before a call: returns at once when the last minute has room, else waits
        for it (the run shows `rate:<name>` as its wait meanwhile), at most `timeout` (then
        WaitTimeout), ending early with RunCancelled if the run is cancelled. Settle the
        estimate with `ctx.cost(..., tokens_in=, tokens_out=)` or the Grant's `settle`."""
        rates.check_name(name)
        tokens = _count(tokens, "tokens", rates.MAX_TOKENS_PER_MINUTE)
        requests = _count(requests, "requests", rates.MAX_REQUESTS_PER_MINUTE)
        if not (tokens or requests):
            raise InvalidInput("acquire: asks for no requests and no tokens", field="requests")
        deadline = time.monotonic() + parse_duration(timeout, field="timeout").total_seconds()
        showing = False
        try:
            while True:
                self.check_cancel()
                taken = rates.take_alone(self._engine, name, requests=requests, tokens=tokens)
                if taken.granted:
                    grant = Grant(name, taken.second, requests, tokens, self._engine)
                    self._grants.append(grant)
                    return grant
                if taken.limit is None:
                    with self._engine.connect() as conn:
                        rates.check_known(conn, [name])  # raises, listing the defined ones
                    raise InvalidInput(f"no rate limit named {name!r}", field="name")
                if taken.wait_s < 0:
                    raise InvalidInput(
                        f"acquire({name!r}): {requests:,} requests and {tokens:,} tokens is "
                        f"more than the limit allows in a minute ({taken.limit.to_dict()}): "
                        "it can never fit; split the call",
                        field="tokens",
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(
                        f"acquire({name!r}): no room for {requests:,} requests and {tokens:,} "
                        f"tokens within the timeout"
                    )
                if not showing:
                    showing = self._show_wait(rates.PREFIX + name)
                self._stop.wait(min(taken.wait_s + random.uniform(0, JITTER_S), left))
        finally:
            if showing:
                self._show_wait(None)

    def _show_wait(self, reason: str | None) -> bool:
        """Write what the running run waits for (None: nothing any more)."""
        with self._engine.begin() as conn:
            conn.execute(
                update(runs)
                .where(fence.owned(self._claim.run_id, self._claim.attempt))
                .values(wait_reason=reason)
            )
        return True

    def _settle_grant(self, tokens: int) -> None:
        """`ctx.cost` reports the actual tokens of a call: the oldest open grant is settled."""
        while self._grants:
            grant = self._grants.pop(0)
            if not grant.settled and grant.tokens:
                grant.settle(tokens)
                return
