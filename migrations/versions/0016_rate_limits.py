"""rate_limits and rate_usage: named limits in requests and tokens per minute, shared by all workers

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 11:00:00

`limits.define("openai", requests_per_minute=500, tokens_per_minute=200_000)`; a task takes
from it with `@task(rate_limit="openai")` (one request as the run starts: `runs.rate_limit`)
and `ctx.acquire("openai", tokens=...)`. What each limit gave out is counted per second of the
database's clock in `rate_usage`; a take checks the last 61 seconds under a lock on the limit's
row (domain/flow/rates.py). On PostgreSQL that take is one function call, `conveyor_rate_take`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The take, as domain/flow/rates.py's portable `_take_here` does it, in one round trip.
#: Returns whether the limit exists, whether the ask was granted, the second it was counted in,
#: and otherwise how many seconds until enough of the window has passed (-1: it never fits).
TAKE_FUNCTION = """
CREATE OR REPLACE FUNCTION conveyor_rate_take(
    p_name text, p_requests bigint, p_tokens bigint, p_now timestamptz
) RETURNS TABLE (found boolean, granted boolean, second bigint, wait_s double precision,
                 rpm bigint, tpm bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    lim record;
    t double precision;
    s bigint;
    used_r bigint;
    used_t bigint;
    need_r bigint;
    need_t bigint;
    acc_r bigint := 0;
    acc_t bigint := 0;
    b record;
BEGIN
    SELECT l.requests_per_minute AS r, l.tokens_per_minute AS k INTO lim
      FROM rate_limits l WHERE l.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, false, 0::bigint, 0::float8, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    -- The clock is read with the limit locked, so seconds are in the order takes are granted.
    t := extract(epoch FROM coalesce(p_now, clock_timestamp()));
    s := floor(t)::bigint;
    SELECT coalesce(sum(u.requests), 0), coalesce(sum(u.tokens), 0) INTO used_r, used_t
      FROM rate_usage u WHERE u.limit_name = p_name AND u.second > s - 61;
    IF (lim.r IS NULL OR used_r + p_requests <= lim.r)
       AND (lim.k IS NULL OR used_t + p_tokens <= lim.k) THEN
        INSERT INTO rate_usage AS u (limit_name, second, requests, tokens)
            VALUES (p_name, s, p_requests, p_tokens)
            ON CONFLICT (limit_name, second) DO UPDATE
            SET requests = u.requests + excluded.requests, tokens = u.tokens + excluded.tokens;
        DELETE FROM rate_usage u WHERE u.limit_name = p_name AND u.second <= s - 61;
        RETURN QUERY SELECT true, true, s, 0::float8, lim.r, lim.k;
        RETURN;
    END IF;
    IF (lim.r IS NOT NULL AND p_requests > lim.r) OR (lim.k IS NOT NULL AND p_tokens > lim.k) THEN
        RETURN QUERY SELECT true, false, s, -1::float8, lim.r, lim.k;
        RETURN;
    END IF;
    need_r := CASE WHEN lim.r IS NULL THEN 0 ELSE used_r + p_requests - lim.r END;
    need_t := CASE WHEN lim.k IS NULL THEN 0 ELSE used_t + p_tokens - lim.k END;
    FOR b IN SELECT u.second AS at, u.requests AS r, u.tokens AS k FROM rate_usage u
              WHERE u.limit_name = p_name AND u.second > s - 61 ORDER BY u.second LOOP
        acc_r := acc_r + b.r;
        acc_t := acc_t + b.k;
        IF acc_r >= need_r AND acc_t >= need_t THEN
            RETURN QUERY SELECT true, false, s, greatest(b.at + 61 - t, 0)::float8, lim.r, lim.k;
            RETURN;
        END IF;
    END LOOP;
    RETURN QUERY SELECT true, false, s, 61::float8, lim.r, lim.k;
END
$$;
"""


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("requests_per_minute", sa.BigInteger(), nullable=True),
        sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True),
        sa.Column("defined_in", sa.String(length=10), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "requests_per_minute IS NOT NULL OR tokens_per_minute IS NOT NULL",
            name=op.f("ck_rate_limits_some_limit"),
        ),
        sa.CheckConstraint(
            "requests_per_minute IS NULL OR requests_per_minute > 0",
            name=op.f("ck_rate_limits_rpm"),
        ),
        sa.CheckConstraint(
            "tokens_per_minute IS NULL OR tokens_per_minute > 0", name=op.f("ck_rate_limits_tpm")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_rate_limits")),
    )
    op.create_table(
        "rate_usage",
        sa.Column("limit_name", sa.String(length=100), nullable=False),
        sa.Column("second", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["limit_name"],
            ["rate_limits.name"],
            name=op.f("fk_rate_usage_limit_name_rate_limits"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("limit_name", "second", name=op.f("pk_rate_usage")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit", sa.String(length=100), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(TAKE_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS conveyor_rate_take(text, bigint, bigint, timestamptz)")
    # A run waiting for room in a rate limit goes back to pending: without limits it just runs.
    waiters = "status = 'waiting' AND wait_reason LIKE 'rate:%'"
    op.execute(f"UPDATE runs SET attempt = attempt - 1 WHERE {waiters} AND started_at IS NULL")
    op.execute(
        f"UPDATE runs SET status = 'pending', wait_reason = NULL, dispatched_at = NULL "
        f"WHERE {waiters}"
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("rate_limit")
    op.drop_table("rate_usage")
    op.drop_table("rate_limits")
