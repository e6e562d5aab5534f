"""platform tables: schedules, pipelines, secrets, tokens, webhooks, stats, usage

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 06:06:05.663061
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import domain.db.types

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "api_tokens",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "role IN ('admin', 'write', 'readonly')", name=op.f("ck_api_tokens_role")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "notification_rules",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "on_statuses",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("name_pattern", sa.String(length=200), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_rules")),
    )
    op.create_table(
        "pipelines",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "tags",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "config",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "warnings",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("requirements_hash", sa.String(length=64), nullable=True),
        sa.Column("env_ready_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_cache_warmup", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("setup_duration_s", sa.Float(), nullable=True),
        sa.Column("total_runs", sa.BigInteger(), nullable=False),
        sa.Column("successful_runs", sa.BigInteger(), nullable=False),
        sa.Column("failed_runs", sa.BigInteger(), nullable=False),
        sa.Column("webhook_runs", sa.BigInteger(), nullable=False),
        sa.Column("synced_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_pipelines")),
    )
    op.create_table(
        "run_stats",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("period_start", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("project", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column(
            "counts",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("duration_p50_s", sa.Float(), nullable=True),
        sa.Column("duration_p95_s", sa.Float(), nullable=True),
        sa.Column("duration_max_s", sa.Float(), nullable=True),
        sa.Column("cost_usd", domain.db.types.Money(precision=20, scale=10), nullable=False),
        sa.Column("tokens_in", sa.BigInteger(), nullable=False),
        sa.Column("tokens_out", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("period IN ('hour', 'day')", name=op.f("ck_run_stats_period")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_stats")),
        sa.UniqueConstraint(
            "period", "period_start", "project", "name", name="uq_run_stats_bucket"
        ),
    )
    op.create_table(
        "secrets",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("is_parameter", sa.Boolean(), nullable=False),
        sa.Column("created_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_secrets")),
    )
    op.create_table(
        "project_usage",
        sa.Column("project", sa.String(length=100), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("cost_usd", domain.db.types.Money(precision=20, scale=10), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("reserved_usd", domain.db.types.Money(precision=20, scale=10), nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project"],
            ["projects.name"],
            name=op.f("fk_project_usage_project_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("project", "month", name=op.f("pk_project_usage")),
    )
    op.create_table(
        "schedules",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=100), nullable=False),
        sa.Column("target_kind", sa.String(length=16), nullable=False),
        sa.Column("target_name", sa.String(length=200), nullable=False),
        sa.Column(
            "params",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("queue", sa.String(length=100), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("expression", sa.String(length=200), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("start_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("end_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("misfire_policy", sa.String(length=16), nullable=False),
        sa.Column("catch_up_limit", sa.Integer(), nullable=True),
        sa.Column("overlap_policy", sa.String(length=16), nullable=False),
        sa.Column("jitter_s", sa.Float(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("next_fire_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_fire_at", domain.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "misfire_policy IN ('skip', 'run_once', 'catch_up')", name=op.f("ck_schedules_misfire")
        ),
        sa.CheckConstraint(
            "overlap_policy IN ('allow', 'skip', 'queue')", name=op.f("ck_schedules_overlap")
        ),
        sa.CheckConstraint(
            "trigger IN ('cron', 'interval', 'once')", name=op.f("ck_schedules_trigger")
        ),
        sa.ForeignKeyConstraint(
            ["project"], ["projects.name"], name=op.f("fk_schedules_project_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
        sa.UniqueConstraint("name", name=op.f("uq_schedules_name")),
    )
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.create_index(
            "ix_schedules_due",
            ["next_fire_at"],
            unique=False,
            postgresql_where=sa.text("enabled"),
            sqlite_where=sa.text("enabled"),
        )

    op.create_table(
        "webhooks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=100), nullable=False),
        sa.Column("target_kind", sa.String(length=16), nullable=False),
        sa.Column("target_name", sa.String(length=200), nullable=False),
        sa.Column("secret_ciphertext", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project"], ["projects.name"], name=op.f("fk_webhooks_project_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
        sa.UniqueConstraint("name", name=op.f("uq_webhooks_name")),
    )
    op.create_table(
        "schedule_fires",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "schedule_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("fire_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=True),
        sa.Column("recorded_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "outcome IN ('enqueued', 'skipped_misfire', 'skipped_overlap')",
            name=op.f("ck_schedule_fires_outcome"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_schedule_fires_run_id_runs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["schedule_id"],
            ["schedules.id"],
            name=op.f("fk_schedule_fires_schedule_id_schedules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedule_fires")),
        sa.UniqueConstraint("schedule_id", "fire_at", name="uq_schedule_fires_slot"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "webhook_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("delivery_id", sa.String(length=255), nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=True),
        sa.Column("received_at", domain.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_webhook_deliveries_run_id_runs"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_webhook_deliveries_webhook_id_webhooks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("webhook_id", "delivery_id", name="uq_webhook_deliveries_delivery"),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("callback_url", sa.Text(), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("callback_url")

    op.drop_table("webhook_deliveries")
    op.drop_table("schedule_fires")
    op.drop_table("webhooks")
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_schedules_due", postgresql_where=sa.text("enabled"), sqlite_where=sa.text("enabled")
        )

    op.drop_table("schedules")
    op.drop_table("project_usage")
    op.drop_table("secrets")
    op.drop_table("run_stats")
    op.drop_table("pipelines")
    op.drop_table("notification_rules")
    op.drop_table("api_tokens")
