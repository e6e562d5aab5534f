"""What `conveyor pipelines` and `conveyor secrets` do, apart from how the CLI shows it: list
pipelines with their state, describe one, sync the table, build environments ahead of the
first run, and reach the secret store. The environments are uv's (worker/pipelines/envs.py),
so this lives with the worker's side of pipelines."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from domain.clock import utc_now
from domain.db.engine import create_db_engine
from domain.errors import ConveyorError
from domain.pipelines import store as pipeline_store
from domain.pipelines.discovery import (
    DiscoveredPipeline,
    PipelineDirectory,
    pipeline_directory_for,
    pipeline_settings,
)
from domain.security.crypto import secret_key_from
from domain.security.secrets import SecretStore
from domain.settings import Settings, get_settings
from worker.pipelines.envs import EnvManager
from worker.pipelines.notebooks import env_packages

#: How warming reports progress: (message, level, pipeline name).
Say = Callable[[str, str, str], None]


@dataclass
class PipelineTools:
    settings: Settings
    engine: Engine

    @property
    def paths(self) -> Any:
        return pipeline_settings(self.settings)

    def directory(self) -> PipelineDirectory:
        return pipeline_directory_for(self.settings)

    def envs(self) -> EnvManager:
        return EnvManager(self.paths.cache_dir, timeout_s=self.paths.setup_timeout_s)

    def secrets(self) -> SecretStore:
        return SecretStore(self.engine, secret_key_from(self.settings))

    def listing(self, *, sync: bool = True) -> list[dict[str, Any]]:
        """Every pipeline's row with its status and environment state; `sync` re-reads the
        folders first."""
        if sync:
            pipeline_store.sync(self.engine, self.directory())
        rows = pipeline_store.list_rows(self.engine)
        found = {p.name: p for p in self.directory().all()}
        for row in rows:
            row["status"] = status_of(row)
            row["environment"] = self.env_state(found.get(row["name"]))
        return rows

    def describe(self, name: str) -> dict[str, Any]:
        """One pipeline: where it is, its pipeline.json, environment, secrets and counters.
        UnknownTask (naming the pipelines there are) when there is none by that name."""
        directory = self.directory()
        pipeline_store.sync(self.engine, directory)
        pipeline = directory.get(name)
        row = pipeline_store.list_rows(self.engine, name)[0]
        config = pipeline.config
        stored = {s.name for s in self.secrets().list_all()}
        counters = ("total_runs", "successful_runs", "failed_runs", "webhook_runs")
        return {
            "name": name,
            "path": str(pipeline.path),
            "status": pipeline.status,
            "error": pipeline.error,
            "warnings": list(pipeline.warnings),
            "requirements": pipeline.requirements.name if pipeline.requirements else None,
            "requirements_hash": pipeline.requirements_hash,
            "environment": self.env_state(pipeline),
            "secrets": {s: s in stored for s in (config.secrets if config else [])},
            "schedule": config.schedule_spec() if config else None,
            "config": config.model_dump(mode="json") if config else None,
            **{k: row[k] for k in counters},
            "last_cache_warmup": row["last_cache_warmup"],
            "setup_duration_s": row["setup_duration_s"],
        }

    def sync(self) -> tuple[PipelineDirectory, pipeline_store.SyncReport, list[str]]:
        """Re-read the folders into the table, and disable schedules no pipeline declares any
        more: (the directory, what changed, the schedules disabled)."""
        from scheduler.declared import sync_pipeline_schedules

        directory = self.directory()
        report = pipeline_store.sync(self.engine, directory)
        return directory, report, sync_pipeline_schedules(self.engine, directory)

    def warm(self, name: str | None, say: Say) -> list[dict[str, Any]]:
        """Build environments (all runnable pipelines, or only `name`) and record the warmup
        and setup time; one result per pipeline, failures included."""
        directory, envs = self.directory(), self.envs()
        pipeline_store.sync(self.engine, directory)
        results: list[dict[str, Any]] = []
        for pipeline in [directory.get(name)] if name else directory.all():
            if not pipeline.runnable:
                if name:
                    pipeline.require_runnable()  # the error, naming why
                continue
            results.append(self._warm_one(pipeline, envs, say))
        return results

    def _warm_one(self, pipeline: DiscoveredPipeline, envs: EnvManager, say: Say) -> dict[str, Any]:
        config = pipeline.require_runnable()

        def log(message: str, level: str = "info") -> None:
            say(message, level, pipeline.name)

        try:
            info = envs.ensure(
                pipeline.requirements,
                config.python_version,
                log=log,
                packages=env_packages(pipeline),
            )
        except ConveyorError as exc:
            return {"name": pipeline.name, "ok": False, "error": str(exc)}
        pipeline_store.record_env(
            self.engine,
            pipeline.name,
            env_hash=info.env_hash,
            setup_s=info.setup_s,
            now=utc_now(),
            warmup=True,
        )
        return {
            "name": pipeline.name,
            "ok": True,
            "environment": "bare interpreter" if info.env_hash is None else "uv venv",
            "built": info.built,
            "setup_s": round(info.setup_s, 3),
        }

    def env_state(self, pipeline: DiscoveredPipeline | None) -> str:
        if pipeline is None or pipeline.config is None:
            return "-"
        packages = env_packages(pipeline)
        if pipeline.requirements is None and not packages:
            return "bare"
        try:
            ready = self.envs().is_ready(
                pipeline.requirements, pipeline.config.python_version, packages=packages
            )
        except ConveyorError as exc:
            return f"unavailable: {exc}"
        return "ready" if ready else "not built"


def status_of(row: dict[str, Any]) -> str:
    if row["error"]:
        return "invalid"
    return "enabled" if row["enabled"] else "disabled"


@contextmanager
def pipeline_tools() -> Iterator[PipelineTools]:
    """PipelineTools on the configured database, disposed at the end."""
    settings = get_settings()
    engine = create_db_engine(settings.effective_database_url, pool_size=1)
    try:
        yield PipelineTools(settings, engine)
    finally:
        engine.dispose()
