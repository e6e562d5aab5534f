"""The leader's outbound sweep: queue what finished runs owe, POST what is due, record it.

A pass runs on a thread of its own, so a slow or silent receiver never holds up the leader's
loop (relay, reaper, the leadership check); workers never send anything. Deliveries are
at-least-once: a receiver dedupes on X-Conveyor-Delivery ("{run_id}:{attempt}").
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import structlog
from sqlalchemy import Engine

from domain.callbacks import outbound
from domain.callbacks.messages import MAX_ERROR
from domain.callbacks.rules import list_rules, shown_url
from domain.callbacks.urls import is_public, undeliverable
from domain.clock import Clock, utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.security.crypto import secret_key_from
from domain.settings import Settings
from domain.webhooks.inbound import signature

log = structlog.get_logger("conveyor.outbound")

USER_AGENT = "conveyor-outbound/1"
BATCH = 50
MAX_BATCHES = 10


@dataclass
class PassReport:
    queued: int = 0
    delivered: int = 0
    retried: int = 0
    gave_up: int = 0


def non_public_address(url: str) -> str | None:
    """Why `url` must not be posted to (its host resolves to a non-public address), or None.

    Checked before each attempt, on the name httpx connects to, after `undeliverable` has
    refused the IPv4 spellings resolvers read differently. A name that does not resolve now is
    left to the POST, which fails and is retried like any other network error. (A DNS answer
    that changes between this check and the connection is not caught; receivers on internal
    networks should not rely on this alone.)
    """
    parsed = httpx.URL(url)
    try:
        infos = socket.getaddrinfo(parsed.raw_host.decode(), None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not is_public(address):
            return (
                f"refused: {parsed.host} resolves to {address}, which is not a public address "
                "(set CONVEYOR_OUTBOUND_ALLOW_PRIVATE=true to allow internal receivers)"
            )
    return None


class OutboundSweeper:
    """`tick()` from the leader's loop starts a pass in the background at most every
    `interval_s`, and never two at once; `run_once()` is the pass itself (tests call it)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        clock: Clock = utc_now,
        secret_key: str | None = None,
        interval_s: float = 1.0,
        concurrency: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.policy = outbound.OutboundPolicy.from_settings(settings)
        self.timeout_s = settings.outbound_timeout_s
        self.allow_private = settings.outbound_allow_private
        self.secret_key = secret_key if secret_key is not None else secret_key_from(settings)
        self.interval_s = interval_s
        self.concurrency = concurrency
        self.transport = transport
        self._thread: threading.Thread | None = None
        self._next_pass = 0.0

    def tick(self) -> None:
        now_m = time.monotonic()
        if now_m < self._next_pass or (self._thread is not None and self._thread.is_alive()):
            return
        self._next_pass = now_m + self.interval_s
        self._thread = threading.Thread(
            target=self._background_pass, name="conveyor-outbound", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for a pass in progress (at shutdown, or in tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _background_pass(self) -> None:
        try:
            self.run_once()
        except Exception as exc:  # a failing pass must not end the thread silently
            log.error("outbound.sweep_failed", error=f"{type(exc).__name__}: {exc}")

    def run_once(self) -> PassReport:
        report = PassReport()
        rule_list = list_rules(UnitOfWork(self.engine), enabled_only=True)
        report.queued = outbound.discover(
            self.engine, now=self.clock(), rule_list=rule_list, policy=self.policy
        )
        with httpx.Client(
            timeout=self.timeout_s,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            transport=self.transport,
        ) as client:
            for _ in range(MAX_BATCHES):
                due = outbound.claim_due(
                    self.engine, now=self.clock(), limit=BATCH, policy=self.policy
                )
                if not due:
                    break
                items = outbound.prepare(self.engine, due, secret_key=self.secret_key)
                for item, result in zip(items, self._send_all(client, items), strict=True):
                    outcome = outbound.record(
                        self.engine, item, result, now=self.clock(), policy=self.policy
                    )
                    self._count(report, outcome, item, result)
                if len(due) < BATCH:
                    break
        return report

    def _send_all(
        self, client: httpx.Client, items: Sequence[outbound.Outgoing]
    ) -> list[outbound.Result]:
        if len(items) == 1:
            return [self._send(client, items[0])]
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="conveyor-post") as pool:
            return list(pool.map(lambda item: self._send(client, item), items))

    def _send(self, client: httpx.Client, item: outbound.Outgoing) -> outbound.Result:
        """One POST's outcome; never raises, so one bad row cannot stop the others' pass."""
        if item.problem is not None:
            return outbound.Result(error=item.problem)
        try:
            # Rows queued before a URL check existed, or written around it, meet it here.
            problem = undeliverable(item.due.url)
            if problem is not None:
                return outbound.Result(error=f"refused: {problem}", permanent=True)
            if not self.allow_private:
                refused = non_public_address(item.due.url)
                if refused is not None:
                    return outbound.Result(error=refused, permanent=True)
        except Exception as exc:  # retried like a network error, given up at the deadline
            return outbound.Result(error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR])
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Conveyor-Event": "run.finished",
            "X-Conveyor-Timestamp": timestamp,
            "X-Conveyor-Delivery": item.delivery_id,
            "X-Conveyor-Signature": signature(item.secret, timestamp, item.body),
        }
        try:
            # The receiver's answer body is not read: the status says all we need.
            with client.stream("POST", item.due.url, content=item.body, headers=headers) as answer:
                code = answer.status_code
        except Exception as exc:  # connection refused, timeout, a URL httpx cannot use, ...
            return outbound.Result(error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR])
        if 200 <= code < 300:
            return outbound.Result(status_code=code)
        return outbound.Result(status_code=code, error=f"HTTP {code}")

    @staticmethod
    def _count(
        report: PassReport, outcome: str, item: outbound.Outgoing, result: outbound.Result
    ) -> None:
        fields = {
            "run_id": str(item.due.run_id),
            "delivery": item.due.kind,
            "rule_id": item.due.rule_id or None,
            "url": shown_url(item.due.url),
            "attempt": item.due.attempts + 1,
        }
        if outcome == "delivered":
            report.delivered += 1
            log.info("outbound.delivered", status_code=result.status_code, **fields)
        elif outcome == "retry":
            report.retried += 1
            log.info("outbound.retry", error=result.error, **fields)  # a retry is not an error
        elif outcome == "gave_up":
            report.gave_up += 1
            log.error("outbound.gave_up", error=result.error, **fields)
