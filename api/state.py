"""What the API process holds between requests: engine, publisher, catalog, broker client,
limits. Built without I/O in create_api; started and stopped by the app's lifespan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from sqlalchemy import Engine

from api.intake import WebhookIntake
from api.options import ApiOptions
from conveyor import bootstrap
from domain.clock import utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.pipelines.discovery import pipeline_settings
from domain.ports import Catalog, Publisher
from domain.runs.delivery_checks import DeliveryCheck
from domain.runs.reads import RunReads
from domain.security.crypto import secret_key_from
from domain.settings import Settings
from domain.webhooks import inbound as webhooks
from domain.webhooks.batches import Delivery, Outcome, accept_batch
from domain.webhooks.inbound import Endpoint

log = structlog.get_logger("conveyor.api")


class ApiState:
    """One per app. `start()` creates what the caller did not pass in; `stop()` releases
    only what `start()` created."""

    #: set by create_api (api/metrics.py: ApiMetrics, whose collector reads this state)
    metrics: Any

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None,
        publisher: Publisher | None,
        catalog: Catalog | None,
        secret_key: str | None,
        auth_disabled: bool,
        options: ApiOptions,
    ) -> None:
        self.settings = settings
        self._engine = engine
        self._owns_engine = engine is None
        self.publisher = publisher
        self._publisher_given = publisher is not None
        self.catalog = catalog
        self._catalog_given = catalog is not None
        self.secret_key = secret_key if secret_key is not None else secret_key_from(settings)
        self.auth_disabled = auth_disabled
        self.options = options
        self.redis: Any = None  # redis.Redis when the broker is Redis
        self.intake = WebhookIntake(self._accept_webhooks)
        self.head_revision: str | None = None
        #: /readyz counts a scheduler's absence from the last heartbeat or from here
        self.started_at = utc_now()
        #: The runs page, run detail and webhook lookup (domain/storage.py picks them).
        self._reads: RunReads | None = None
        #: Warnings for runs just created (no live worker for the queue, ...).
        self.delivery: DeliveryCheck | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the API has not started (its lifespan creates the engine)")
        return self._engine

    @property
    def reads(self) -> RunReads:
        if self._reads is None:
            raise RuntimeError("the API has not started (its lifespan opens the reads)")
        return self._reads

    @property
    def artifacts_root(self) -> Path:
        """Where the workers write runs' artifacts, as this server sees it (for downloads)."""
        return pipeline_settings(self.settings).artifacts_root

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.engine)

    def reader(self) -> UnitOfWork:
        """For endpoints that only read: no transaction, so no BEGIN and ROLLBACK round trips
        around the request's statements."""
        return UnitOfWork(self.engine, read_only=True)

    def _accept_webhooks(self, batch: Sequence[Delivery]) -> list[Outcome]:
        return accept_batch(
            self.uow,
            batch,
            secret_key=self.secret_key,
            now=utc_now(),
            tolerance_s=self.options.webhook_tolerance_s,
            publisher=self.publisher,
            catalog=self.catalog,
            lookup=self._endpoints,
        )

    def _endpoints(self, names: set[str]) -> dict[str, Endpoint]:
        """The intake's endpoint lookup through the run reads (on PostgreSQL one prepared
        statement, no pool ping, no transaction)."""
        rows = self.reads.webhook_rows(sorted(names))
        return webhooks.endpoints_of(rows, secret_key=self.secret_key)

    def start(self) -> None:
        from domain.db.migrate import head_revision

        if self._engine is None:
            self._engine = bootstrap.engine_for(self.settings, pool_size=10)
        self._reads = bootstrap.reads_for(self._engine)
        if not self._publisher_given:
            self.publisher = bootstrap.publisher_for(self.settings)
        if not self._catalog_given:
            self.catalog = bootstrap.catalog_for(self.settings, self._engine)
        self.delivery = bootstrap.delivery_checks_for(self._engine)
        self.head_revision = head_revision(self.settings.effective_database_url)
        if is_redis(self.settings.broker_url):
            import redis

            self.redis = redis.Redis.from_url(
                self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2
            )
        if self.auth_disabled:
            log.warning("api.auth_disabled", reason="dev mode: only local clients are served")

    def stop(self) -> None:
        if self._reads is not None:
            self._reads.close()
            self._reads = None
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        if self._owns_engine and self._engine is not None:
            self._engine.dispose()
            self._engine = None


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


async def _state(request: Request) -> ApiState:
    # async on purpose: FastAPI runs a plain-def dependency in the threadpool, which cost
    # every request a thread round trip just to read an attribute.
    return get_state(request)


State = Annotated[ApiState, Depends(_state)]
