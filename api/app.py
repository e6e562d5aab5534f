"""The FastAPI app factory: routes, one error shape, auth, limits and metrics wired together.
Nothing connects at import or in create_api; the lifespan starts and stops the resources."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from api import (
    dashboard,
    docs,
    errors,
    health,
    metrics,
    openapi,
    routes_admin,
    routes_costs,
    routes_limits,
    routes_pipelines,
    routes_runs,
    routes_schedules,
    routes_stats,
    sse,
    webhooks,
)
from api.auth import FailedAuthLimiter, TokenCache
from api.limits import BodyLimit
from api.options import ApiOptions
from api.state import ApiState
from domain.gc_pause import freeze_startup_heap
from domain.ports import Catalog, Publisher
from domain.settings import Settings


def create_api(
    settings: Settings,
    *,
    engine: Engine | None = None,
    publisher: Publisher | None = None,
    catalog: Catalog | None = None,
    secret_key: str | None = None,
    auth_disabled: bool = False,
    options: ApiOptions | None = None,
) -> FastAPI:
    """The status API.

    `engine`, `publisher` and `catalog` default to what `settings` names (made at startup);
    `secret_key` (Fernet, for webhook secrets) to CONVEYOR_SECRET_KEY; `options` to
    ApiOptions.from_settings. `auth_disabled` is for
    `conveyor dev` only: every local caller is an admin and other addresses are refused.
    """
    opts = options or ApiOptions.from_settings(settings)
    state = ApiState(
        settings,
        engine=engine,
        publisher=publisher,
        catalog=catalog,
        secret_key=secret_key,
        auth_disabled=auth_disabled,
        options=opts,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(state.start)
        # FastAPI, pydantic, SQLAlchemy: a large heap of long-lived objects, whose full
        # collection would land on whichever requests were in flight.
        freeze_startup_heap()
        try:
            async with anyio.create_task_group() as tasks:
                await tasks.start(state.intake.run)  # accepting before the first request
                try:
                    yield
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            gc.unfreeze()
            await run_in_threadpool(state.stop)

    app = FastAPI(
        title="conveyor",
        summary="Durable background work: runs, logs, webhooks, metrics.",
        version="1",
        lifespan=lifespan,
        # conveyor reports through Prometheus (/metrics) and structlog. FastAPI's native
        # OpenTelemetry, left on, asks OpenTelemetry for its three global providers on every
        # request only to find none configured (a visible share of a read's CPU).
        telemetry={"tracing": False, "metrics": False, "logs": False},
        docs_url=None,  # /docs and /redoc come from api/docs.py, with no CDN
        redoc_url=None,
    )
    state.metrics = metrics.ApiMetrics(state)
    app.state.api = state
    app.state.limiter = FailedAuthLimiter(opts)
    app.state.tokens = TokenCache(opts.token_cache_s)
    errors.install(app)
    openapi.install(app)
    docs.install(app)
    # Routes are matched in this order, one pattern after another: the busiest go first
    # (no two of these routers' paths overlap, so the order changes nothing else).
    for module in (
        webhooks,
        routes_runs,
        sse,
        health,
        routes_schedules,
        routes_pipelines,
        routes_stats,
        routes_costs,
        routes_limits,
        routes_admin,
    ):
        app.include_router(module.router)
    dashboard.install(app)  # last: its pages share no path with the routes above

    def limit_for(path: str) -> int:
        return opts.webhook_max_bytes if path.startswith("/hooks/") else opts.body_max_bytes

    def refused(path: str) -> None:
        if path.startswith("/hooks/"):  # the route never sees these deliveries
            state.metrics.webhooks.labels("too_large").inc()

    # Added last = outermost: metrics also see the 413s the limit sends before routing.
    app.add_middleware(BodyLimit, limit_for=limit_for, on_refused=refused)
    app.add_middleware(metrics.RequestMetrics, metrics=state.metrics)
    return app
