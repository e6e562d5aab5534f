"""The `pipelines` and `run_artifacts` tables: sync from discovery, counters, environments,
artifacts. Core statements, portable between PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, select, update

from domain.clock import Clock, utc_now
from domain.db import sql
from domain.db.models import RunArtifact
from domain.db.models_platform import Pipeline
from domain.pipelines.discovery import DiscoveredPipeline, PipelineDirectory
from domain.runs.states import Status

pipelines_table = cast(Table, Pipeline.__table__)
artifacts_table = cast(Table, RunArtifact.__table__)

FAILED_STATUSES = frozenset({Status.FAILED, Status.TIMED_OUT, Status.BUDGET_EXCEEDED})


@dataclass
class SyncReport:
    """What one sync changed: names added, kept, disabled by an error, and gone from disk."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "added": self.added,
            "updated": self.updated,
            "invalid": self.invalid,
            "missing": self.missing,
        }


def _upsert(conn: Connection, table: Table, keys: Sequence[str], values: dict[str, Any]) -> None:
    """INSERT … ON CONFLICT DO UPDATE on both databases (two workers may sync at once)."""
    stmt = sql.insert(conn, table).values(**values)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=list(keys),
            set_={k: stmt.excluded[k] for k in values if k not in keys},
        )
    )


def row_values(pipeline: DiscoveredPipeline, now: datetime) -> dict[str, Any]:
    config = pipeline.config
    return {
        "name": pipeline.name,
        "path": str(pipeline.path.resolve()),
        "description": config.description if config else None,
        "tags": list(config.tags) if config else None,
        "config": config.model_dump(mode="json", exclude_defaults=False) if config else None,
        "enabled": pipeline.runnable,
        "error": pipeline.error,
        "warnings": list(pipeline.warnings) or None,
        "requirements_hash": pipeline.requirements_hash,
        "synced_at": now,
    }


def sync(engine: Engine, directory: PipelineDirectory, *, clock: Clock = utc_now) -> SyncReport:
    """Bring the `pipelines` table in line with the folders on disk, in one transaction.

    Counters and environment records survive; a pipeline whose folder is gone stays listed
    (disabled, with why) so its history keeps a name.
    """
    now = clock()
    found = directory.all()
    report = SyncReport()
    with engine.begin() as conn:
        known = set(conn.execute(select(pipelines_table.c.name)).scalars())
        for pipeline in found:
            _upsert(conn, pipelines_table, ["name"], row_values(pipeline, now))
            (report.updated if pipeline.name in known else report.added).append(pipeline.name)
            if pipeline.error is not None:
                report.invalid.append(pipeline.name)
        gone = sorted(known - {p.name for p in found})
        if gone:
            conn.execute(
                update(pipelines_table)
                .where(pipelines_table.c.name.in_(gone))
                .values(
                    enabled=False,
                    error=f"the folder is gone from {directory.root}",
                    synced_at=now,
                )
            )
        report.missing = gone
    return report


def record_outcome(conn: Connection, name: str, status: str, triggered_by: str | None) -> None:
    """Count one finished pipeline run; call inside the run's final transaction so the
    counters are exact (a final state is written once, so it is counted once)."""
    table = pipelines_table
    succeeded = status == Status.SUCCEEDED
    conn.execute(
        update(table)
        .where(table.c.name == name)
        .values(
            total_runs=table.c.total_runs + 1,
            successful_runs=table.c.successful_runs + (1 if succeeded else 0),
            failed_runs=table.c.failed_runs + (1 if status in FAILED_STATUSES else 0),
            webhook_runs=table.c.webhook_runs + (1 if triggered_by == "webhook" else 0),
        )
    )


def record_env(
    engine: Engine,
    name: str,
    *,
    env_hash: str | None,
    setup_s: float | None,
    now: datetime,
    warmup: bool,
) -> None:
    """Note that `name`'s environment is ready (after a build, or `pipelines warm`)."""
    values: dict[str, Any] = {"env_ready_at": now}
    if env_hash is not None:
        values["requirements_hash"] = env_hash
    if setup_s is not None:
        values["setup_duration_s"] = setup_s
    if warmup:
        values["last_cache_warmup"] = now
    with engine.begin() as conn:
        conn.execute(update(pipelines_table).where(pipelines_table.c.name == name).values(values))


def list_rows(engine: Engine, name: str | None = None) -> list[dict[str, Any]]:
    """The stored pipelines (as the CLI and API show them), by name."""
    stmt = select(pipelines_table).order_by(pipelines_table.c.name)
    if name is not None:
        stmt = stmt.where(pipelines_table.c.name == name)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(stmt).mappings()]


@dataclass(frozen=True, slots=True)
class ArtifactRecord:
    name: str
    path: str
    size_bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
        }


def record_artifacts(
    engine: Engine, run_id: uuid.UUID, items: Iterable[ArtifactRecord], *, now: datetime
) -> int:
    """Upsert the run's artifacts (a retry that rewrites a file updates its row)."""
    count = 0
    with engine.begin() as conn:
        for item in items:
            _upsert(
                conn,
                artifacts_table,
                ["run_id", "name"],
                {"run_id": run_id, **item.to_dict(), "created_at": now},
            )
            count += 1
    return count
