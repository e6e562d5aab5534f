"""Prometheus /metrics: this process's HTTP and webhook counters, plus what the database and
the broker say (recent runs by name and status, durations, backlog, dispatch lag, queues)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import structlog
from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.broker import queue_depths
from api.options import ApiOptions
from domain.clock import utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ConveyorError
from domain.flow import manage as limits
from domain.housekeeping import monitoring as observability
from domain.settings import Settings

log = structlog.get_logger("conveyor.api.metrics")


class Observed(Protocol):
    """What the collector reads from the API's state (api/state.py: ApiState)."""

    settings: Settings
    options: ApiOptions
    redis: Any

    def reader(self) -> UnitOfWork: ...


class ApiMetrics:
    """One registry per app, so several apps in one process (tests) never collide."""

    def __init__(self, state: Observed) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "conveyor_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "conveyor_http_request_duration_seconds",
            "Time to answer HTTP requests (streams: until they end), by route template.",
            ["route"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "conveyor_webhook_deliveries",
            "Webhook deliveries by outcome: accepted, duplicate, unauthorized, not_found, "
            "too_large, bad_request, invalid, conflict, error.",
            ["outcome"],
            registry=self.registry,
        )
        self.sse_streams = Gauge(
            "conveyor_api_sse_streams",
            "Live log streams open right now.",
            registry=self.registry,
        )
        self.registry.register(DatabaseCollector(state))


class DatabaseCollector:
    """Reads the database and broker at scrape time, at most once per `metrics_cache_s`, so
    several scrapers (or a refreshing dashboard) cost one set of queries."""

    def __init__(self, state: Observed) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._cached_at = float("-inf")

    def describe(self) -> list[Metric]:
        return []  # families are only known after a scrape; skip the registration-time read

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if time.monotonic() - self._cached_at >= self.state.options.metrics_cache_s:
                self._cached = list(self._read())
                self._cached_at = time.monotonic()
            yield from self._cached

    def _read(self) -> Iterator[Metric]:
        state = self.state
        window = state.options.metrics_window_s
        up = GaugeMetricFamily("conveyor_database_up", "1 when the database answered.")
        try:
            snap = observability.snapshot(state.reader(), now=utc_now(), window_s=window)
        except (ConveyorError, OSError) as exc:
            log.warning("metrics.database_unavailable", reason=str(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        recent = GaugeMetricFamily(
            "conveyor_runs_recent",
            f"Runs created in the last {window:g}s, by name and current status.",
            labels=["name", "status"],
        )
        for (name, status), count in sorted(snap.recent.items()):
            recent.add_metric([name, status], count)
        yield recent
        durations = GaugeHistogramMetricFamily(
            "conveyor_run_duration_seconds",
            f"Durations of finished runs created in the last {window:g}s, by name.",
            labels=["name"],
        )
        for name, hist in sorted(snap.durations.items()):
            buckets = [(f"{bound:g}", float(n)) for bound, n in hist.buckets]
            buckets.append(("+Inf", float(hist.count)))
            durations.add_metric([name], buckets, gsum_value=hist.total_s)
        yield durations
        active = GaugeMetricFamily(
            "conveyor_runs_active", "Runs pending or running now.", labels=["status"]
        )
        for status in ("pending", "running"):
            active.add_metric([status], snap.active.get(status, 0))
        yield active
        yield GaugeMetricFamily(
            "conveyor_dispatch_lag_seconds",
            "Age of the oldest pending run that is due (0 when none waits): the outbox lag.",
            value=snap.oldest_due_age_s,
        )
        yield from self._limits()
        yield from self._queues(snap.pending_queues)

    def _limits(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            "conveyor_limit_waiting",
            "Runs waiting for a limit: kind rate (per rate limit, at start or in ctx.acquire) "
            f"or concurrency (per key, the busiest {limits.MAX_KEYS_MEASURED}).",
            labels=["kind", "name"],
        )
        for kind, name, count in limits.waiting_per_limit(self.state.reader(), now=utc_now()):
            waiting.add_metric([kind, name], count)
        yield waiting

    def _queues(self, pending: list[str]) -> Iterator[Metric]:
        state = self.state
        if state.redis is None:
            return
        names = {state.settings.default_queue, state.settings.submit_queue, *pending} - {""}
        broker_up = GaugeMetricFamily("conveyor_broker_up", "1 when the broker answered.")
        try:
            depths = queue_depths(state.redis, sorted(names))
        except OSError as exc:
            log.warning("metrics.broker_unavailable", reason=str(exc))
            broker_up.add_metric([], 0)
            yield broker_up
            return
        broker_up.add_metric([], 1)
        yield broker_up
        depth = GaugeMetricFamily(
            "conveyor_queue_depth", "Messages waiting in the broker, by queue.", labels=["queue"]
        )
        for queue, n in sorted(depths.items()):
            depth.add_metric([queue], n)
        yield depth


class RequestMetrics:
    """Counts every answer by route template (never the raw path: ids would explode the
    label set), including 413s sent before routing and 500s from crashes."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - started)


def exposition(metrics: ApiMetrics) -> Response:
    """The registry in Prometheus text format."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
