"""Directory pipelines on the worker: uv environments, the subprocess runner, its events.

`build_pipeline_runner()` is what WorkerRuntime calls: it reads the settings, syncs the
`pipelines` table and checks the secret key, so a misconfiguration stops the worker at start.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from domain.pipelines.discovery import PipelineDirectory, pipeline_settings
from domain.ports import Publisher
from domain.security.crypto import secret_key_from
from worker.masked_sink import LineSink
from worker.pipelines.envs import EnvManager, InterpreterNotFound, PipelineEnvError
from worker.pipelines.events import EVENT_PREFIX
from worker.pipelines.runner import (
    PipelineFailed,
    PipelineMemoryExceeded,
    PipelineStopped,
    SubprocessPipelineRunner,
)


def build_pipeline_runner(
    settings: Any,
    engine: Engine,
    writer: LineSink,
    *,
    publisher: Publisher | None = None,
    startup: bool = True,
) -> SubprocessPipelineRunner:
    """The runner for `settings` (pipelines_dir, pipeline cache, artifacts, secret key)."""
    ps = pipeline_settings(settings)
    runner = SubprocessPipelineRunner(
        engine,
        writer,
        PipelineDirectory(ps.pipelines_dir, secret_key=secret_key_from(settings)),
        EnvManager(ps.cache_dir, timeout_s=ps.setup_timeout_s),
        artifacts_root=ps.artifacts_root,
        secret_key=secret_key_from(settings),
        kill_grace_s=float(getattr(settings, "kill_grace_s", 5.0)),
        publisher=publisher,
    )
    if startup:
        runner.startup()
    return runner


__all__ = [
    "EVENT_PREFIX",
    "EnvManager",
    "InterpreterNotFound",
    "PipelineEnvError",
    "PipelineFailed",
    "PipelineMemoryExceeded",
    "PipelineStopped",
    "SubprocessPipelineRunner",
    "build_pipeline_runner",
]
