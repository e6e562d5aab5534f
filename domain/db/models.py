"""SQLAlchemy 2 typed models: the tables DESIGN.md describes (runs and what hangs off them)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    Uuid,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from domain.clock import utc_now, uuid7
from domain.db.types import JSONType, Money, UTCDateTime

# Stable constraint names, so Alembic revisions are reproducible on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ZERO = Decimal(0)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        datetime: UTCDateTime(),
        Decimal: Money(),
        dict[str, Any]: JSONType,
        uuid.UUID: Uuid(),
    }


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (
        CheckConstraint("on_limit IN ('stop', 'hold')", name="on_limit"),
        CheckConstraint("weight BETWEEN 1 AND 1000", name="weight"),
    )

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    monthly_cost_limit_usd: Mapped[Decimal | None]
    monthly_token_limit: Mapped[int | None] = mapped_column(BigInteger)
    #: What a run does when its project is at a monthly limit as it is claimed: `stop` ends it
    #: `budget_exceeded` before it starts; `hold` keeps it pending until the limit allows it.
    on_limit: Mapped[str] = mapped_column(String(8), default="stop", server_default="stop")
    #: Its share of a busy queue's starts against other projects' (domain/flow/fair.py).
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


def _partial_index(name: str, *columns: str, where: str, unique: bool = False) -> Index:
    """An index over only the rows that match `where`, on PostgreSQL and SQLite alike."""
    predicate = text(where)
    return Index(name, *columns, unique=unique, postgresql_where=predicate, sqlite_where=predicate)


class Run(Base):
    """One execution of a task or pipeline; the pending row is also its delivery intent.

    The keys that other tables declare to runs (ON DELETE CASCADE or SET NULL) are foreign keys
    on SQLite and triggers on PostgreSQL (migration 0022), which do a delete's cascade in one
    statement per table instead of one per run; they mean the same on both."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority_range"),
        CheckConstraint("kind IN ('task', 'pipeline')", name="kind"),
        CheckConstraint(
            "status IN ('pending', 'running', 'waiting', 'succeeded', 'failed', 'cancelled', "
            "'timed_out', 'budget_exceeded')",
            name="status",
        ),
        # Idempotency keys are unique per project (guarantee 4). Partial, like the indexes
        # on finished_at and parent_run_id: most runs have no key, no parent, and are not
        # finished when inserted, and an entry per NULL only made every enqueue cost more.
        _partial_index(
            "uq_runs_project_idempotency_key",
            "project",
            "idempotency_key",
            where="idempotency_key IS NOT NULL",
            unique=True,
        ),
        # The relay's sweep: pending runs due for (re-)publishing.
        _partial_index("ix_runs_pending_due", "not_before", where="status = 'pending'"),
        # The relay's sweep for waiting runs: those whose wake time has come.
        _partial_index("ix_runs_waiting_due", "not_before", where="status = 'waiting'"),
        # The reaper's sweep: running runs by lease expiry.
        _partial_index("ix_runs_running_lease", "lease_expires_at", where="status = 'running'"),
        Index("ix_runs_created", "created_at", "id"),
        Index("ix_runs_name_created", "name", "created_at"),
        Index("ix_runs_status_created", "status", "created_at"),
        # Rollups and the callbacks/notifications sweep read runs by when they finished.
        _partial_index("ix_runs_finished_at", "finished_at", where="finished_at IS NOT NULL"),
        # Children of a run (retries, chains), and ON DELETE SET NULL when a parent goes.
        _partial_index("ix_runs_parent_run_id", "parent_run_id", where="parent_run_id IS NOT NULL"),
        # Fair share (domain/flow/fair.py): a busy queue's runs waiting for their project's
        # turn, oldest first per project; and the published runs not yet claimed, per queue.
        _partial_index(
            "ix_runs_paced",
            "queue",
            "project",
            "created_at",
            where="paced AND dispatched_at IS NULL AND status = 'pending'",
        ),
        _partial_index(
            "ix_runs_in_flight",
            "queue",
            "project",
            where="status = 'pending' AND dispatched_at IS NOT NULL",
        ),
        # Keyed concurrency: a key's holders and waiters (domain/flow/concurrency.py).
        _partial_index(
            "ix_runs_concurrency_key",
            "concurrency_key",
            "status",
            "created_at",
            where="concurrency_key IS NOT NULL",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    project: Mapped[str] = mapped_column(
        String(100), ForeignKey("projects.name", ondelete="RESTRICT"), default="default"
    )
    kind: Mapped[str] = mapped_column(String(16), default="task")
    name: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(100), default="default")
    priority: Mapped[int] = mapped_column(SmallInteger, default=5)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    triggered_by: Mapped[str] = mapped_column(String(20), default="api")
    trigger_ref: Mapped[str | None] = mapped_column(String(255))
    not_before: Mapped[datetime] = mapped_column(default=utc_now)
    dispatched_at: Mapped[datetime | None]
    dispatch_attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Created while its queue was busy: published in its project's turn (domain/flow/fair.py).
    paced: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    timeout_s: Mapped[float | None] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    budget_usd: Mapped[Decimal | None]
    max_requests: Mapped[int | None] = mapped_column(Integer)
    max_minutes: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[Decimal] = mapped_column(default=ZERO)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)
    requests_made: Mapped[int] = mapped_column(Integer, default=0)
    #: How many cost entries the run has: the last entry's seq. Taken by the same UPDATE that
    #: adds an entry (or a batch of them) to the totals above, so entries are numbered once.
    cost_entry_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error_type: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    parent_run_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("runs.id", ondelete="SET NULL")
    )
    #: POSTed a signed summary when the run ends (issue: callbacks out)
    callback_url: Mapped[str | None] = mapped_column(Text)
    #: While `waiting`: what the run waits for (`sleep`), until `not_before`.
    wait_reason: Mapped[str | None] = mapped_column(String(255))
    #: At most concurrency_max runs with this key run at once (domain/flow/concurrency.py).
    concurrency_key: Mapped[str | None] = mapped_column(String(200))
    concurrency_max: Mapped[int | None] = mapped_column(Integer)
    #: The named rate limit one request of which the run takes as it starts
    #: (domain/flow/rates.py).
    rate_limit: Mapped[str | None] = mapped_column(String(100))


def _run_fk() -> Mapped[uuid.UUID]:
    return mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)


class RunStep(Base):
    """A step of a run, as people watch it; a checkpointed step (`ctx.step(name, fn)`) also
    has its `occurrence` (the n-th step of that name in the run) and, once completed, its
    `result`, which later attempts return instead of running the step again."""

    __tablename__ = "run_steps"
    __table_args__ = (
        CheckConstraint(
            "status IN ('planned', 'running', 'completed', 'failed', 'skipped')", name="status"
        ),
        # A checkpointed step is one row per run, name and occurrence, whatever the attempt.
        _partial_index(
            "uq_run_steps_occurrence",
            "run_id",
            "name",
            "occurrence",
            where="occurrence IS NOT NULL",
            unique=True,
        ),
    )

    run_id: Mapped[uuid.UUID] = _run_fk()
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    name: Mapped[str] = mapped_column(String(200))
    step_type: Mapped[str] = mapped_column(String(50), default="step")
    status: Mapped[str] = mapped_column(String(20), default="planned")
    detail: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    occurrence: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[Any | None] = mapped_column(JSONType)
    #: How many times the step's function was called (in-place retries and later attempts).
    tries: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class RunSignal(Base):
    """A signal sent to a run (`client.signal`, the API, `conveyor runs signal`), kept until a
    `ctx.wait_for` of its name consumes it; a repeated `key` is the same signal, kept once."""

    __tablename__ = "run_signals"
    __table_args__ = (
        _partial_index(
            "uq_run_signals_key", "run_id", "name", "key", where="key IS NOT NULL", unique=True
        ),
        Index("ix_run_signals_run_name", "run_id", "name", "id"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    key: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[Any | None] = mapped_column(JSONType)
    sent_at: Mapped[datetime] = mapped_column(default=utc_now)
    consumed_at: Mapped[datetime | None]


class RunLog(Base):
    """A log line; `seq` orders a run's lines across attempts and is the `after_seq` cursor.

    `run_id` has no foreign key, on purpose: PostgreSQL checks a foreign key once per row, and
    for log lines that check was two thirds of the database's work per line (migration 0009).
    Every writer instead locks the lines' runs once per batch (`FOR KEY SHARE`, the lock the
    key's check took per row) and drops lines of a run that no longer exists; deleting runs
    goes through `domain.runs.lines.delete_runs`, which takes their lines along.

    On PostgreSQL the table is partitioned by range of run_id, a day of uuid7 ids per
    partition (migration 0019, domain/db/partitions.py): a run's lines are all in one partition,
    and retention drops a day's partition once every run of that day is gone.
    """

    __tablename__ = "run_logs"

    run_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    ts: Mapped[datetime]
    stream: Mapped[str] = mapped_column(String(10), default="log")
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)
    fields: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class RunMetric(Base):
    """A metric sample. Partitioned on PostgreSQL as run_logs is (migration 0019); there the key
    is (id, run_id), since a partitioned table's keys must hold its partition key (id alone
    stays unique: its sequence hands it out)."""

    __tablename__ = "run_metrics"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    ts: Mapped[datetime]
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class CostEntry(Base):
    """One recorded spend. `seq` numbers a run's entries from 1 in the order they were written
    (runs.cost_entry_count hands the numbers out)."""

    __tablename__ = "cost_entries"
    # Written as often as log lines, so kept to what reads need, like a log line: one B-tree,
    # the key (run_id, seq) that serves the run detail and cascade deletes, and no sequence;
    # by time for reports, BRIN on PostgreSQL: entries arrive in time order, and a BRIN index
    # costs next to nothing per insert where a B-tree costs a page write.
    __table_args__ = (Index("ix_cost_entries_ts", "ts", postgresql_using="brin"),)

    run_id: Mapped[uuid.UUID] = _run_fk()
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    step_seq: Mapped[int | None] = mapped_column(Integer)
    project: Mapped[str] = mapped_column(String(100))
    ts: Mapped[datetime]
    provider: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)
    requests: Mapped[int] = mapped_column(Integer, default=1)
    cost_usd: Mapped[Decimal] = mapped_column(default=ZERO)


class RunArtifact(Base):
    __tablename__ = "run_artifacts"

    run_id: Mapped[uuid.UUID] = _run_fk()
    name: Mapped[str] = mapped_column(String(500), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[datetime] = mapped_column(default=utc_now)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utc_now)
    running: Mapped[int] = mapped_column(Integer, default=0)
    stopped: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditLog(Base):
    __tablename__ = "audit_logs"
    __table_args__ = (Index("ix_audit_logs_target", "target_type", "target_id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    ts: Mapped[datetime] = mapped_column(default=utc_now, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    target_type: Mapped[str] = mapped_column(String(50))
    target_id: Mapped[str | None] = mapped_column(String(200))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    ip: Mapped[str | None] = mapped_column(String(64))


# Core handles for the hot path (SQLAlchemy Core statements, no ORM session work).
class DeadLetter(Base):
    """A broker message conveyor refused (malformed, unknown task, bad params), with why."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    ts: Mapped[datetime] = mapped_column(default=utc_now, index=True)
    task: Mapped[str] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    reason: Mapped[str] = mapped_column(Text)


runs = cast(Table, Run.__table__)
run_logs = cast(Table, RunLog.__table__)
run_steps = cast(Table, RunStep.__table__)
run_signals = cast(Table, RunSignal.__table__)
projects = cast(Table, Project.__table__)
audit_logs = cast(Table, AuditLog.__table__)
cost_entries = cast(Table, CostEntry.__table__)
dead_letters = cast(Table, DeadLetter.__table__)
workers = cast(Table, Worker.__table__)
