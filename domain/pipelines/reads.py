"""Read side of the `pipelines` table for the API: the list, and one pipeline with its counters,
its last run and its last failure. Discovery and sync write the table (domain/pipelines/store.py);
this module only reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Engine, Table, select

from domain.db.models import runs
from domain.db.models_platform import Pipeline
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, NotFound, UnknownTask
from domain.ports import Catalog, OpenCatalog, TargetDefaults
from domain.runs.states import Status
from domain.runs.views import jsonable

pipelines = cast(Table, Pipeline.__table__)

FAILED = (Status.FAILED, Status.TIMED_OUT, Status.BUDGET_EXCEEDED)
_LISTED = (
    "name",
    "description",
    "tags",
    "enabled",
    "error",
    "warnings",
    "requirements_hash",
    "env_ready_at",
    "last_cache_warmup",
    "setup_duration_s",
    "synced_at",
)
_COUNTERS = ("total_runs", "successful_runs", "failed_runs", "webhook_runs")


class PipelineNotFound(NotFound):
    """No pipeline has this name (conveyor lists the pipelines it discovered)."""


@dataclass(frozen=True, slots=True)
class PipelineView:
    row: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.row["name"])

    @property
    def enabled(self) -> bool:
        return bool(self.row["enabled"])

    @property
    def error(self) -> str | None:
        return cast(str | None, self.row["error"])

    def to_dict(self, *, detail: bool = False) -> dict[str, Any]:
        data = {key: jsonable(self.row[key]) for key in _LISTED}
        data["counters"] = {key.removesuffix("_runs"): int(self.row[key] or 0) for key in _COUNTERS}
        if detail:
            data["path"] = self.row["path"]
            data["config"] = self.row["config"]
        return data


def list_pipelines(uow: UnitOfWork) -> list[PipelineView]:
    with uow:
        rows = uow.conn.execute(select(pipelines).order_by(pipelines.c.name)).mappings()
        return [PipelineView(dict(row)) for row in rows]


def get_pipeline(uow: UnitOfWork, name: str) -> PipelineView:
    with uow:
        row = uow.conn.execute(select(pipelines).where(pipelines.c.name == name)).mappings().first()
    if row is None:
        raise PipelineNotFound(f"no pipeline named {name[:200]!r}", name=name)
    return PipelineView(dict(row))


_RUN_SUMMARY = (
    runs.c.id,
    runs.c.status,
    runs.c.attempt,
    runs.c.triggered_by,
    runs.c.created_at,
    runs.c.started_at,
    runs.c.finished_at,
    runs.c.error_type,
    runs.c.error,
)


def pipeline_detail(uow: UnitOfWork, name: str) -> dict[str, Any]:
    """The pipeline with its counters, its newest run and its newest failed run."""
    view = get_pipeline(uow, name)
    newest = (
        select(*_RUN_SUMMARY)
        .where(runs.c.kind == "pipeline", runs.c.name == name)
        .order_by(runs.c.created_at.desc(), runs.c.id.desc())
        .limit(1)
    )
    with uow:
        last = uow.conn.execute(newest).mappings().first()
        failure = (
            uow.conn.execute(newest.where(runs.c.status.in_([s.value for s in FAILED])))
            .mappings()
            .first()
        )
    data = view.to_dict(detail=True)
    data["last_run"] = _run(last)
    data["last_failure"] = _run(failure)
    # What went wrong last: the pipeline's own problem (it does not validate), else its last
    # failed run's error.
    data["last_error"] = view.error or (
        f"{failure['error_type']}: {failure['error']}" if failure is not None else None
    )
    return data


def _run(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {key: jsonable(value) for key, value in dict(row).items()}


class PipelineNotRunnable(Conflict):
    """The pipeline exists but cannot run (its configuration does not validate)."""


class TableCatalog:
    """Resolves pipeline names for producers: `inner` first (it knows a pipeline's params and
    defaults once pipelines are in the process's catalog), else the `pipelines` table, which
    says only whether the pipeline exists and can run; the worker checks the params then. An
    OpenCatalog (which accepts any name) is not asked."""

    def __init__(self, engine: Engine, inner: Catalog | None) -> None:
        self.engine = engine
        self.inner = inner

    def resolve(self, name: str, params: dict[str, Any]) -> tuple[TargetDefaults, dict[str, Any]]:
        if self.inner is not None and not isinstance(self.inner, OpenCatalog):
            try:
                return self.inner.resolve(name, params)
            except UnknownTask:
                pass
        try:
            view = get_pipeline(UnitOfWork(self.engine), name)
        except PipelineNotFound:
            raise UnknownTask(f"no pipeline named {name[:200]!r}", name=name) from None
        if not view.enabled:
            raise PipelineNotRunnable(
                f"pipeline {name!r} cannot run: {view.error or 'it is disabled'}", name=name
            )
        return TargetDefaults(kind="pipeline"), params

    def names(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(conn.execute(select(pipelines.c.name)).scalars())
