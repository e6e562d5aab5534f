"""Helpers for pipeline tests: folders written on the fly, and the real executor around them."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from domain.db.models import RunMetric, run_logs, run_steps
from domain.db.unit_of_work import UnitOfWork
from domain.pipelines.discovery import PipelineCatalog, PipelineDirectory
from domain.runs import control, enqueue
from domain.runs.artifacts import listed
from domain.runs.requests import build_request
from domain.runs.views import RunView
from domain.tasks.catalog import CompositeCatalog
from domain.tasks.registry import Registry, RegistryCatalog
from tests.polling import eventually
from worker import capture
from worker.executor import Executor
from worker.logwriter import LogWriter
from worker.monitor import RunMonitor
from worker.pipelines.envs import EnvManager
from worker.pipelines.runner import SubprocessPipelineRunner

FIXTURES = Path(__file__).resolve().parent / "pipelines_fixtures"
ROOT = Path(__file__).resolve().parents[1]


def shared_env_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uv cache per test session (and per xdist worker): an environment is built once."""
    path = tmp_path_factory.getbasetemp() / "pipeline-envs"
    path.mkdir(exist_ok=True)
    return path


def make_pipeline(
    root: Path,
    name: str,
    main: str,
    config: dict[str, Any] | str | None = None,
    requirements: str | None = None,
) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(main)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "pipeline.json").write_text(text)
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    return folder


#: A notebook cell: code as text, or (cell_type, source[, metadata]).
Cell = str | tuple[str, str] | tuple[str, str, dict[str, Any]]


def notebook_json(cells: list[Cell]) -> str:
    """An nbformat 4.5 notebook, written out by hand (conveyor's own venv has no nbformat)."""
    out = []
    for n, cell in enumerate(cells):
        kind, source, meta = ("code", cell, {}) if isinstance(cell, str) else (*cell, {})[:3]
        item: dict[str, Any] = {
            "cell_type": kind,
            "id": f"cell-{n}",
            "metadata": meta,
            "source": source,
        }
        if kind == "code":
            item.update(execution_count=None, outputs=[])
        out.append(item)
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return json.dumps(
        {"cells": out, "metadata": {"kernelspec": kernel}, "nbformat": 4, "nbformat_minor": 5}
    )


def make_notebook(
    root: Path, name: str, cells: list[Cell], config: dict[str, Any] | None = None
) -> Path:
    """A notebook pipeline: main.ipynb, and pipeline.json with "type": "notebook"."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.ipynb").write_text(notebook_json(cells))
    (folder / "pipeline.json").write_text(json.dumps({"type": "notebook", **(config or {})}))
    return folder


def copy_fixtures(root: Path, *names: str) -> None:
    for name in names:
        shutil.copytree(FIXTURES / name, root / name)


@dataclass
class PipelineHarness:
    engine: Engine
    writer: LogWriter
    executor: Executor
    runner: SubprocessPipelineRunner
    root: Path

    @property
    def catalog(self) -> CompositeCatalog:
        return CompositeCatalog(
            RegistryCatalog(self.executor.registry),
            PipelineCatalog(self.runner.directory, self.engine),
        )

    def enqueue(self, name: str, params: dict[str, Any] | None = None, **fields: Any) -> uuid.UUID:
        request = build_request(name=name, params=params or {}, **fields)
        return enqueue.enqueue(UnitOfWork(self.engine), request, catalog=self.catalog).run.id

    def run(self, run_id: uuid.UUID, *, until_final: bool = True, timeout: float = 60) -> str:
        """Execute deliveries (as a worker would) until the run ends or, with `until_final`
        off, after the first attempt; backoff waits are served by retrying the delivery."""
        statuses: list[str] = []

        def delivered() -> str | None:
            status = self.executor.execute(run_id).status
            if status == "dropped":  # not due yet (a backoff): deliver it again shortly
                return None
            statuses.append(status)
            return status if status != "retrying" or not until_final else None

        try:
            return eventually(delivered, timeout, every=0.05, what=f"run {run_id} to finish")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; attempts ended: {statuses}") from None

    def get(self, run_id: uuid.UUID) -> RunView:
        return control.get_run(UnitOfWork(self.engine), run_id)

    def lines(self, run_id: uuid.UUID, stream: str | None = None) -> list[str]:
        return [m for s, m, _ in self.logs(run_id) if stream is None or s == stream]

    def logs(self, run_id: uuid.UUID) -> list[tuple[str, str, Any]]:
        self.writer.flush()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(run_logs.c.stream, run_logs.c.message, run_logs.c.fields)
                .where(run_logs.c.run_id == run_id)
                .order_by(run_logs.c.seq)
            ).all()
        return [(r[0], r[1], r[2]) for r in rows]

    def metrics(self, run_id: uuid.UUID) -> dict[str, list[float]]:
        self.writer.flush()
        table = RunMetric.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(table.c.name, table.c.value).where(table.c.run_id == run_id)  # type: ignore[attr-defined]
            ).all()
        out: dict[str, list[float]] = {}
        for name, value in rows:
            out.setdefault(name, []).append(value)
        return out

    def steps(self, run_id: uuid.UUID) -> list[tuple[str, str, str | None]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(run_steps.c.name, run_steps.c.status, run_steps.c.detail)
                .where(run_steps.c.run_id == run_id)
                .order_by(run_steps.c.seq)
            ).all()
        return [(r[0], r[1], r[2]) for r in rows]

    def artifacts(self, run_id: uuid.UUID) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [a.to_dict() for a in listed(conn, run_id)]


@contextmanager
def pipeline_harness(
    engine: Engine,
    root: Path,
    cache: Path,
    artifacts: Path,
    *,
    kill_grace_s: float = 1.0,
    secret_key: str = "",
) -> Iterator[PipelineHarness]:
    """The real executor, log writer and monitor, with the subprocess runner for `root`."""
    root.mkdir(parents=True, exist_ok=True)
    writer = LogWriter(engine, flush_interval_s=0.05)
    writer.start()
    capture.install()
    holder: list[Executor] = []
    monitor = RunMonitor(
        engine,
        lease_s=30,
        tick_s=0.1,
        kill_grace_s=kill_grace_s,
        on_abandon=lambda ctx: holder[0].abandon(ctx),  # noqa: PLW0108 - bound later
    )
    runner = SubprocessPipelineRunner(
        engine,
        writer,
        PipelineDirectory(root, secret_key=secret_key),
        EnvManager(cache, timeout_s=120),
        artifacts_root=artifacts,
        secret_key=secret_key,
        kill_grace_s=kill_grace_s,
    )
    executor = Executor(
        engine, writer, Registry(), monitor, owner="test-worker", lease_s=30, pipelines=runner
    )
    holder.append(executor)
    try:
        yield PipelineHarness(engine, writer, executor, runner, root)
    finally:
        monitor.close()
        executor.close()
        # Wait for the monitor's last heartbeat: a connection it still holds when the engine
        # is disposed would be left open (a ResourceWarning, so an error, later).
        thread = getattr(monitor, "_thread", None)
        if thread is not None:
            thread.join(timeout=10)
        writer.close()


@contextmanager
def tmp_pipeline_harness(
    engine: Engine, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, **options: Any
) -> Iterator[PipelineHarness]:
    """`pipeline_harness` with its pipelines and artifacts under `tmp_path` and the session's
    shared environment cache (what each test file's fixture wants)."""
    cache = shared_env_cache(tmp_path_factory)
    with pipeline_harness(
        engine, tmp_path / "pipelines", cache, tmp_path / "artifacts", **options
    ) as harness:
        yield harness


@contextmanager
def sqlite_pipeline_harness(
    sqlite_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineHarness]:
    """A pipeline harness on a SQLite database of its own: for tests about processes rather
    than the database."""
    from domain.db.engine import create_db_engine

    engine = create_db_engine(sqlite_url)
    try:
        with tmp_pipeline_harness(engine, tmp_path, tmp_path_factory) as harness:
            yield harness
    finally:
        engine.dispose()
