"""Tables around runs: schedules, pipelines, secrets, API tokens, webhooks, notifications,
rollups and project usage (DESIGN.md, "Core objects")."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from domain.clock import utc_now
from domain.db.models import ZERO, Base
from domain.db.types import JSONType


def _id() -> Mapped[int]:
    return mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )


class Schedule(Base):
    __tablename__ = "schedules"
    __table_args__ = (
        CheckConstraint("trigger IN ('cron', 'interval', 'once')", name="trigger"),
        CheckConstraint("misfire_policy IN ('skip', 'run_once', 'catch_up')", name="misfire"),
        CheckConstraint("overlap_policy IN ('allow', 'skip', 'queue')", name="overlap"),
        Index(
            "ix_schedules_due",
            "next_fire_at",
            postgresql_where=text("enabled"),
            sqlite_where=text("enabled"),
        ),
    )

    id: Mapped[int] = _id()
    name: Mapped[str] = mapped_column(String(200), unique=True)
    project: Mapped[str] = mapped_column(
        String(100), ForeignKey("projects.name"), default="default"
    )
    target_kind: Mapped[str] = mapped_column(String(16), default="task")
    target_name: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    queue: Mapped[str | None] = mapped_column(String(100))
    priority: Mapped[int | None] = mapped_column(Integer)
    trigger: Mapped[str] = mapped_column(String(16))
    expression: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    start_at: Mapped[datetime | None]
    end_at: Mapped[datetime | None]
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    misfire_policy: Mapped[str] = mapped_column(String(16), default="skip")
    catch_up_limit: Mapped[int | None] = mapped_column(Integer)
    overlap_policy: Mapped[str] = mapped_column(String(16), default="allow")
    jitter_s: Mapped[float] = mapped_column(Float, default=0.0)
    #: where it was declared: cli/api (kept until removed), code or pipeline (synced)
    source: Mapped[str] = mapped_column(String(16), default="cli")
    next_fire_at: Mapped[datetime | None]
    last_fire_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)


class ScheduleFire(Base):
    """Every slot of every schedule, fired or skipped, exactly once (guarantee 5)."""

    __tablename__ = "schedule_fires"
    __table_args__ = (
        UniqueConstraint("schedule_id", "fire_at", name="uq_schedule_fires_slot"),
        CheckConstraint(
            "outcome IN ('enqueued', 'skipped_misfire', 'skipped_overlap')", name="outcome"
        ),
        # Deleting a run sets its fire's run_id to NULL: without this, a scan of every fire.
        Index(
            "ix_schedule_fires_run_id",
            "run_id",
            postgresql_where=text("run_id IS NOT NULL"),
            sqlite_where=text("run_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = _id()
    schedule_id: Mapped[int] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    fire_at: Mapped[datetime]
    outcome: Mapped[str] = mapped_column(String(20))
    run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    recorded_at: Mapped[datetime] = mapped_column(default=utc_now)


class Pipeline(Base):
    """A discovered directory pipeline, its validation state, environment and counters."""

    __tablename__ = "pipelines"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    error: Mapped[str | None] = mapped_column(Text)
    warnings: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    requirements_hash: Mapped[str | None] = mapped_column(String(64))
    env_ready_at: Mapped[datetime | None]
    last_cache_warmup: Mapped[datetime | None]
    setup_duration_s: Mapped[float | None] = mapped_column(Float)
    total_runs: Mapped[int] = mapped_column(BigInteger, default=0)
    successful_runs: Mapped[int] = mapped_column(BigInteger, default=0)
    failed_runs: Mapped[int] = mapped_column(BigInteger, default=0)
    webhook_runs: Mapped[int] = mapped_column(BigInteger, default=0)
    synced_at: Mapped[datetime] = mapped_column(default=utc_now)


class CatalogTask(Base):
    """A task some worker has: what producers need to check and complete a run of it without
    importing its code. Workers publish it when they start (domain/tasks/catalog.py)."""

    __tablename__ = "task_catalog"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    #: sha256 of params_schema and options: a worker rewrites the row only when it changed.
    version: Mapped[str] = mapped_column(String(64))
    params_schema: Mapped[dict[str, Any]] = mapped_column(JSONType)
    #: queue, priority, max_attempts, timeout_s, retry, schedule, on_success, on_failure.
    options: Mapped[dict[str, Any]] = mapped_column(JSONType)
    module: Mapped[str | None] = mapped_column(String(300))
    registered_by: Mapped[str | None] = mapped_column(String(200))
    registered_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)
    #: Refreshed by every worker that has the task, about once a minute.
    last_seen_at: Mapped[datetime] = mapped_column(default=utc_now)


class Secret(Base):
    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)
    is_parameter: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint("role IN ('admin', 'write', 'readonly')", name="role"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Webhook(Base):
    __tablename__ = "webhooks"

    id: Mapped[int] = _id()
    name: Mapped[str] = mapped_column(String(200), unique=True)
    project: Mapped[str] = mapped_column(
        String(100), ForeignKey("projects.name"), default="default"
    )
    target_kind: Mapped[str] = mapped_column(String(16), default="task")
    target_name: Mapped[str] = mapped_column(String(200))
    secret_ciphertext: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class WebhookDelivery(Base):
    """One producer delivery id maps to exactly one run (guarantee 4)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "delivery_id", name="uq_webhook_deliveries_delivery"),
        # As for schedule_fires: retention's run deletes find a delivery by its run.
        Index(
            "ix_webhook_deliveries_run_id",
            "run_id",
            postgresql_where=text("run_id IS NOT NULL"),
            sqlite_where=text("run_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = _id()
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    delivery_id: Mapped[str] = mapped_column(String(255))
    run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    received_at: Mapped[datetime] = mapped_column(default=utc_now)


class NotificationRule(Base):
    """Signed POSTs when runs end in chosen states (`conveyor notify add`)."""

    __tablename__ = "notification_rules"

    id: Mapped[int] = _id()
    on_statuses: Mapped[dict[str, Any]] = mapped_column(default=dict)
    name_pattern: Mapped[str | None] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16), default="json")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class RunStat(Base):
    """Hourly and daily rollups per project and name."""

    __tablename__ = "run_stats"
    __table_args__ = (
        UniqueConstraint("period", "period_start", "project", "name", name="uq_run_stats_bucket"),
        CheckConstraint("period IN ('hour', 'day')", name="period"),
    )

    id: Mapped[int] = _id()
    period: Mapped[str] = mapped_column(String(8))
    period_start: Mapped[datetime]
    project: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(200))
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    duration_p50_s: Mapped[float | None] = mapped_column(Float)
    duration_p95_s: Mapped[float | None] = mapped_column(Float)
    duration_max_s: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[Decimal] = mapped_column(default=ZERO)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)


class ProjectUsage(Base):
    """A project's spend and reservations in one calendar month (UTC): the row that monthly
    limits are checked and reserved against atomically."""

    __tablename__ = "project_usage"

    project: Mapped[str] = mapped_column(
        String(100), ForeignKey("projects.name", ondelete="CASCADE"), primary_key=True
    )
    month: Mapped[date] = mapped_column(Date, primary_key=True)
    cost_usd: Mapped[Decimal] = mapped_column(default=ZERO)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_usd: Mapped[Decimal] = mapped_column(default=ZERO)
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class OutboundDelivery(Base):
    """A signed POST owed for a finished run: its callback_url, or a notification rule's URL.
    Retried with backoff by the scheduler; each attempt is also logged as a run event."""

    __tablename__ = "outbound_deliveries"
    __table_args__ = (
        UniqueConstraint("run_id", "kind", "rule_id", name="uq_outbound_deliveries_target"),
        Index(
            "ix_outbound_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("delivered_at IS NULL AND gave_up_at IS NULL"),
            sqlite_where=text("delivered_at IS NULL AND gave_up_at IS NULL"),
        ),
    )

    id: Mapped[int] = _id()
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # callback | notify
    rule_id: Mapped[int] = mapped_column(Integer, default=0)  # 0 for the run's own callback
    url: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utc_now)
    delivered_at: Mapped[datetime | None]
    gave_up_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class SweepCursor(Base):
    """Where an incremental sweep (notifications, rollups, retention) stopped last time."""

    __tablename__ = "sweep_cursors"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    position: Mapped[datetime | None]
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)


class CostReservation(Base):
    """Headroom reserved by `ctx.reserve()` against a run's and its project's budget, until
    settled by the actual cost or released."""

    __tablename__ = "cost_reservations"

    id: Mapped[int] = _id()
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    project: Mapped[str] = mapped_column(String(100))
    month: Mapped[date] = mapped_column(Date)
    usd: Mapped[Decimal] = mapped_column(default=ZERO)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    settled_at: Mapped[datetime | None]


class RateLimitRow(Base):
    """A named rate limit shared by all workers (domain/flow/rates.py): requests and tokens per
    minute, either or both. Defined in code (synced when a worker starts), by the CLI or the API."""

    __tablename__ = "rate_limits"
    __table_args__ = (
        CheckConstraint(
            "requests_per_minute IS NOT NULL OR tokens_per_minute IS NOT NULL", name="some_limit"
        ),
        CheckConstraint("requests_per_minute IS NULL OR requests_per_minute > 0", name="rpm"),
        CheckConstraint("tokens_per_minute IS NULL OR tokens_per_minute > 0", name="tpm"),
    )

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    requests_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    #: Where it was defined last: code, cli or api.
    defined_in: Mapped[str] = mapped_column(String(10))
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)


class RateUsage(Base):
    """What a rate limit gave out in one second (Unix seconds, the database's clock): the
    window a take checks is the last 61 of these rows."""

    __tablename__ = "rate_usage"

    limit_name: Mapped[str] = mapped_column(
        String(100), ForeignKey("rate_limits.name", ondelete="CASCADE"), primary_key=True
    )
    second: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
