"""The executor's PipelineRunner: environment, secrets, process, events, artifacts, follow-ups.

`run(ctx)` returns `{"exit_code": 0, "result": <the result event's value or null>, "artifacts":
[names]}` or raises: PipelineFailed (non-zero exit, `exit_code` on the exception),
PipelineMemoryExceeded (mem_hard_limit crossed, killed), PipelineStopped (cancel, timeout,
budget: the executor records the stop reason). The exit code is also left on `ctx.exit_code`
for the executor to store in `runs.exit_code`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import structlog
from sqlalchemy import Engine

from domain.clock import Clock, utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ConveyorError
from domain.pipelines import store as pipeline_store
from domain.pipelines.config import PipelineConfig
from domain.pipelines.discovery import DiscoveredPipeline, PipelineCatalog, PipelineDirectory
from domain.pipelines.env import compose_env, params_env, pipeline_params, run_env_overrides
from domain.ports import Publisher
from domain.runs import enqueue
from domain.runs.requests import build_request
from domain.security.masking import MASK, Masker
from domain.security.secrets import SecretStore, SecretValue
from domain.tasks.registry import RetryPolicy
from worker import capture
from worker.context import TaskContext
from worker.masked_sink import LineSink
from worker.pipelines.artifacts import collect_artifacts
from worker.pipelines.envs import EnvInfo, EnvManager
from worker.pipelines.events import EVENT_PREFIX, EventHandler
from worker.pipelines.lines import CUT_MARK, split_cut
from worker.pipelines.notebooks import env_packages, launch
from worker.pipelines.process import (
    Limits,
    PipelineProcess,
    ProcessOutcome,
)
from worker.pipelines.tree import Sample

log = structlog.get_logger("conveyor.pipelines")

#: What a pipeline inherits from the worker's environment (the "defaults" layer); nothing
#: else, so the worker's database URL and secret key never reach pipeline code.
INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "TERM",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
)
MAX_ARTIFACTS = 1000


class PipelineFailed(ConveyorError):
    """The pipeline exited with a non-zero code."""

    def __init__(self, message: str | None = None, *, exit_code: int, **context: object) -> None:
        super().__init__(message, exit_code=exit_code, **context)
        self.exit_code = exit_code


class NotebookFailed(PipelineFailed):
    """A notebook pipeline failed: its report names the cell and holds the traceback."""

    self_explanatory = True  # the worker's own traceback would only hide the cell's


class PipelineMemoryExceeded(PipelineFailed):
    """The pipeline went over its mem_hard_limit and was killed."""


class PipelineStopped(ConveyorError):
    """The pipeline was stopped (cancel, timeout or budget) and its processes killed."""


class SubprocessPipelineRunner:
    """Runs directory pipelines for the executor (worker/executor.py's PipelineRunner)."""

    def __init__(
        self,
        engine: Engine,
        writer: LineSink,
        directory: PipelineDirectory,
        envs: EnvManager,
        *,
        artifacts_root: Path,
        secret_key: str = "",
        kill_grace_s: float = 5.0,
        publisher: Publisher | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.directory = directory
        self.envs = envs
        self.artifacts_root = Path(artifacts_root).absolute()
        self.secrets = SecretStore(engine, secret_key)
        # The monitor gives up on a stopped run kill_grace_s after the stop; SIGKILL comes
        # well before that, so the processes are gone by the time the run is recorded.
        self.term_grace_s = max(0.1, kill_grace_s * 0.5)
        self.publisher = publisher
        self.clock = clock

    def startup(self) -> pipeline_store.SyncReport:
        """At worker start: sync the pipelines table, and check the secret key opens the stored
        secrets (a wrong or missing key is a clear error now, not a failed run later)."""
        report = pipeline_store.sync(self.engine, self.directory, clock=self.clock)
        self.secrets.verify()
        return report

    def retry_policy(self, name: str) -> RetryPolicy:
        return self.directory.get(name).retry_policy

    def run(self, ctx: TaskContext) -> Any:
        pipeline = self.directory.get(ctx.name)
        config = pipeline.require_runnable()
        secret_values = self.secrets.values(config.secrets)
        hidden = [v.value for v in secret_values.values() if not v.is_parameter]
        # encrypted_env: its plaintexts, and its tokens too (main.py may print pipeline.json).
        masker = Masker([*hidden, *pipeline.opened_env.masked()])
        # Everything the run records from here on (lines, events, steps, costs, its result and
        # error in the executor) passes the masker, the worker's own prints during it included.
        sink = ctx.mask_secrets(masker)
        capture.bind(sink, ctx.run_id, ctx.attempt)
        system = _SystemLog(sink, ctx)
        env_info = self.envs.ensure(
            pipeline.requirements,
            config.python_version,
            log=system,
            should_stop=lambda: ctx.cancelled,
            packages=env_packages(pipeline),
        )
        if env_info.built:
            pipeline_store.record_env(
                self.engine,
                pipeline.name,
                env_hash=env_info.env_hash,
                setup_s=env_info.setup_s,
                now=self.clock(),
                warmup=False,
            )
        artifacts = self.artifacts_root / str(ctx.run_id)
        artifacts.mkdir(parents=True, exist_ok=True)
        env, shown = self._environment(ctx, pipeline, config, env_info, secret_values, artifacts)
        system.event(
            "pipeline environment",
            {
                "env": shown,
                "python": str(env_info.python),
                "requirements_hash": env_info.env_hash,
                "setup_s": round(env_info.setup_s, 3),
                "uv": self.envs.uv_version() if env_info.env_hash else None,
            },
        )
        events = EventHandler(ctx, sink)
        scratch = Path(tempfile.mkdtemp(prefix="conveyor-run-"))
        try:
            start = launch(pipeline, config, env_info.python, artifacts=artifacts, scratch=scratch)
            outcome = self._spawn(ctx, pipeline, config, start.argv, env, sink, masker, events)
            failure = start.failure()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        # Read by the executor when it writes runs.exit_code (an attribute TaskContext may not
        # declare yet, hence the cast).
        cast(Any, ctx).exit_code = outcome.exit_code
        # A stop that arrives just after a clean exit still ends the run as stopped.
        ok = outcome.killed_for is None and outcome.returncode == 0 and not ctx.cancelled
        events.close(succeeded=ok)
        names = self._record_artifacts(ctx, artifacts, system, masker)
        self.writer.metric(ctx.run_id, "peak_rss_bytes", float(outcome.peak_rss))
        if outcome.throttled_s:
            self.writer.metric(ctx.run_id, "cpu_throttled_s", round(outcome.throttled_s, 3))
        try:
            return self._outcome(ctx, config, outcome, events, names, start.entry, failure)
        finally:
            self._follow_ups(ctx, config, ok, system)

    # -- pieces of run() ---------------------------------------------------------------------
    def _environment(
        self,
        ctx: TaskContext,
        pipeline: DiscoveredPipeline,
        config: PipelineConfig,
        env_info: EnvInfo,
        secret_values: dict[str, SecretValue],
        artifacts: Path,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """(the child's environment, the part of it worth showing: what conveyor set)."""
        defaults = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        defaults.setdefault("PATH", os.defpath)
        defaults.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        if env_info.location is not None:
            defaults["VIRTUAL_ENV"] = str(env_info.location)
            defaults["PATH"] = f"{env_info.location / 'bin'}{os.pathsep}{defaults['PATH']}"
        secrets_env = {name: v.value for name, v in secret_values.items()}
        params = pipeline_params(ctx.params)
        layers = {
            "pipeline_env": {**config.default_env, **pipeline.opened_env.values},
            "secrets": secrets_env,
            "overrides": run_env_overrides(ctx.params),
            "params": params_env(ctx.params),
        }
        reserved = {
            "CONVEYOR_RUN_ID": str(ctx.run_id),
            "CONVEYOR_ATTEMPT": str(ctx.attempt),
            "CONVEYOR_PIPELINE": pipeline.name,
            "CONVEYOR_PARAMS": json.dumps(params),
            "CONVEYOR_ARTIFACTS_DIR": str(artifacts),
            "CONVEYOR_EVENT_PREFIX": EVENT_PREFIX,
        }
        env = compose_env(defaults=defaults, reserved=reserved, **layers)
        named = {k for layer in layers.values() for k in layer} | set(reserved)
        hidden = {n for n, v in secret_values.items() if not v.is_parameter}
        hidden |= set(pipeline.opened_env.values)
        shown = {k: (MASK if k in hidden else env[k]) for k in sorted(named) if k in env}
        return env, shown

    def _spawn(
        self,
        ctx: TaskContext,
        pipeline: DiscoveredPipeline,
        config: PipelineConfig,
        argv: list[str],
        env: dict[str, str],
        sink: LineSink,
        masker: Masker,
        events: EventHandler,
    ) -> ProcessOutcome:
        run_id, attempt, write = ctx.run_id, ctx.attempt, sink.log

        def on_line(stream: str, text: str) -> None:
            if masker and CUT_MARK in text:
                text = _mask_cut(masker, text)
            if stream == "stdout" and text.startswith(EVENT_PREFIX):
                # Masked before it is decoded too: JSON turns an escaped secret back into plain
                # text, and an event that no longer parses is stored as the (masked) line.
                events.handle(masker(text[len(EVENT_PREFIX) :]))
                return
            write(run_id, attempt, text, stream=stream)

        def on_sample(sample: Sample) -> None:
            self.writer.metric(run_id, "cpu_percent", sample.cpu_percent)
            self.writer.metric(run_id, "rss_bytes", float(sample.rss_bytes))

        def on_soft(resource: str, value: float, limit: float) -> None:
            unit = "bytes" if resource == "memory" else "cores"
            write(
                run_id,
                attempt,
                f"{resource} soft limit crossed: {value:.2f} {unit} > {limit:.2f} {unit}",
                stream="event",
                level="warning",
                fields={"soft_limit": resource, "value": value, "limit": limit},
            )
            self.writer.metric(run_id, "soft_limit_exceeded", value, {"resource": resource})

        process = PipelineProcess(
            argv,
            cwd=str(pipeline.path.absolute()),
            env=env,
            stdin=json.dumps(pipeline_params(ctx.params)).encode(),
            on_line=on_line,
            should_stop=lambda: ctx.cancelled,
            limits=Limits(
                config.cpu_hard_limit,
                config.mem_hard_limit,
                config.cpu_soft_limit,
                config.mem_soft_limit,
            ),
            on_sample=on_sample,
            on_soft_limit=on_soft,
            term_grace_s=self.term_grace_s,
        )
        return process.run()

    def _outcome(
        self,
        ctx: TaskContext,
        config: PipelineConfig,
        outcome: ProcessOutcome,
        events: EventHandler,
        artifacts: list[str],
        entry: str,
        failure: str | None,
    ) -> Any:
        code = outcome.exit_code
        if outcome.killed_for == "stop" or (ctx.cancelled and code != 0):
            raise PipelineStopped(
                f"{entry} was stopped ({ctx.stop_reason or 'stop requested'}); exit code {code}"
            )
        # Masked with the rest of the error by the executor; a cut line's end only here.
        tail = "\n".join(_mask_cut(ctx.masker, line) for line in outcome.stderr_tail)
        detail = f"\nlast lines on stderr:\n{tail}" if tail else ""
        if outcome.killed_for == "memory":
            raise PipelineMemoryExceeded(
                f"{entry} used {outcome.peak_rss / 2**20:.0f} MiB, over its mem_hard_limit of "
                f"{(config.mem_hard_limit or 0) / 2**20:.0f} MiB, and was killed{detail}",
                exit_code=code,
            )
        if outcome.returncode != 0 and failure is not None:  # a notebook: which cell, and why
            raise NotebookFailed(failure, exit_code=code)
        if outcome.returncode != 0:
            raise PipelineFailed(f"{entry} exited with code {code}{detail}", exit_code=code)
        return {
            "exit_code": 0,
            "result": events.result if events.has_result else None,
            "artifacts": artifacts,
        }

    def _record_artifacts(
        self, ctx: TaskContext, folder: Path, system: _SystemLog, masker: Masker
    ) -> list[str]:
        items = collect_artifacts(folder, masker)
        if len(items) > MAX_ARTIFACTS:
            system(
                f"{len(items)} artifacts: only the first {MAX_ARTIFACTS} are recorded", "warning"
            )
            items = items[:MAX_ARTIFACTS]
        if items:
            pipeline_store.record_artifacts(self.engine, ctx.run_id, items, now=self.clock())
        return [item.name for item in items]

    def _follow_ups(
        self, ctx: TaskContext, config: PipelineConfig, succeeded: bool, system: _SystemLog
    ) -> None:
        """downstream_triggers: one follow-up run per trigger, exactly once per run (the
        idempotency key holds across retries and redeliveries). A failure triggers only when
        the run will not be retried."""
        if succeeded:
            wanted = [t for t in config.downstream_triggers if t.on_success]
        else:
            final = ctx.attempt >= ctx._claim.max_attempts or ctx.stop_reason in {
                "timed_out",
                "budget_exceeded",
            }
            if not final or ctx.stop_reason in {"cancelled", "lease_lost"}:
                return
            wanted = [t for t in config.downstream_triggers if t.on_failure]
        catalog = PipelineCatalog(self.directory, self.engine)
        for trigger in wanted:
            request = build_request(
                name=trigger.pipeline,
                project=ctx.project,
                kind="pipeline",
                triggered_by="chain",
                trigger_ref=f"{ctx.name}:{'success' if succeeded else 'failure'}",
                parent_run_id=ctx.run_id,
                idempotency_key=f"chain:{ctx.run_id}:{trigger.pipeline}",
            )
            try:
                done = enqueue.enqueue(
                    UnitOfWork(self.engine, clock=self.clock),
                    request,
                    catalog=catalog,
                    publisher=self.publisher,
                )
            except ConveyorError as exc:
                system(f"downstream trigger {trigger.pipeline!r} not started: {exc}", "error")
                continue
            system(f"downstream run {done.run.id} of {trigger.pipeline!r} enqueued", "info")


def _mask_cut(masker: Masker, line: str) -> str:
    """A line cut at MAX_LINE_BYTES keeps no start of a secret where it was cut."""
    text, note = split_cut(line)
    return masker.cut_short(text) + note if note else line


class _SystemLog:
    """conveyor's own lines in a run's log (environment builds, artifacts, follow-ups)."""

    def __init__(self, writer: LineSink, ctx: TaskContext) -> None:
        self.writer, self.ctx = writer, ctx

    def __call__(self, message: str, level: str = "info") -> None:
        self.writer.log(self.ctx.run_id, self.ctx.attempt, message, level=level)

    def event(self, message: str, fields: dict[str, Any]) -> None:
        self.writer.log(
            self.ctx.run_id, self.ctx.attempt, message, stream="event", level="info", fields=fields
        )


__all__ = [
    "NotebookFailed",
    "PipelineFailed",
    "PipelineMemoryExceeded",
    "PipelineStopped",
    "SubprocessPipelineRunner",
]
