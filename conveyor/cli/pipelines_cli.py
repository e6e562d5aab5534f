"""`conveyor pipelines list|show|sync|warm` and `conveyor secrets set|list|rm|rotate`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import Engine

from conveyor.cli.output import console, key_values, print_json
from domain.errors import InvalidInput

pipelines_app = typer.Typer(
    help="Directory pipelines: list them, inspect one, sync the table, build environments.",
    no_args_is_help=True,
)
secrets_app = typer.Typer(
    help="Secrets for pipelines, encrypted with CONVEYOR_SECRET_KEY. Values never on argv.",
    no_args_is_help=True,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def register(app: typer.Typer) -> None:
    app.add_typer(pipelines_app, name="pipelines")
    app.add_typer(secrets_app, name="secrets")


@dataclass
class _Env:
    settings: Any
    engine: Engine

    @property
    def paths(self) -> Any:
        from domain.pipelines.discovery import pipeline_settings

        return pipeline_settings(self.settings)

    def directory(self) -> Any:
        from domain.pipelines.discovery import PipelineDirectory

        return PipelineDirectory(self.paths.pipelines_dir)

    def envs(self) -> Any:
        from worker.pipelines.envs import EnvManager

        return EnvManager(self.paths.cache_dir, timeout_s=self.paths.setup_timeout_s)

    def secrets(self) -> Any:
        from domain.security.crypto import secret_key_from
        from domain.security.secrets import SecretStore

        return SecretStore(self.engine, secret_key_from(self.settings))


@contextmanager
def _env() -> Iterator[_Env]:
    from domain.db.engine import create_db_engine
    from domain.settings import get_settings

    settings = get_settings()
    engine = create_db_engine(settings.effective_database_url, pool_size=1)
    try:
        yield _Env(settings, engine)
    finally:
        engine.dispose()


# -- pipelines ------------------------------------------------------------------------------
@pipelines_app.command("list")
def list_pipelines(
    sync: Annotated[bool, typer.Option(help="Re-read the folders first.")] = True,
    json_out: JsonFlag = False,
) -> None:
    """Every pipeline with its state; a disabled one shows exactly why."""
    from domain.pipelines import store as pipeline_store

    with _env() as env:
        if sync:
            pipeline_store.sync(env.engine, env.directory())
        rows = pipeline_store.list_rows(env.engine)
        found = {p.name: p for p in env.directory().all()}
        for row in rows:
            row["status"] = _status(row)
            row["environment"] = _env_state(env, found.get(row["name"]))
    if json_out:
        print_json(rows)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "STATUS", "ENV", "RUNS", "OK", "FAILED", "PROBLEM"):
        table.add_column(column, overflow="fold", no_wrap=column == "NAME")
    for row in rows:
        problem = row["error"] or "; ".join(row["warnings"] or [])
        style = {"enabled": "green", "disabled": "yellow"}.get(row["status"], "red")
        table.add_row(
            row["name"],
            f"[{style}]{row['status']}[/]",
            row["environment"],
            str(row["total_runs"]),
            str(row["successful_runs"]),
            str(row["failed_runs"]),
            problem or "",
        )
    console.print(table)


@pipelines_app.command()
def show(
    name: Annotated[str, typer.Argument(help="The pipeline (its folder name).")],
    json_out: JsonFlag = False,
) -> None:
    """One pipeline: where it is, its pipeline.json, environment, secrets and counters."""
    from domain.pipelines import store as pipeline_store

    with _env() as env:
        directory = env.directory()
        pipeline_store.sync(env.engine, directory)
        pipeline = directory.get(name)  # UnknownTask names the pipelines there are
        row = pipeline_store.list_rows(env.engine, name)[0]
        config = pipeline.config
        stored = {s.name for s in env.secrets().list_all()}
        data = {
            "name": name,
            "path": str(pipeline.path),
            "status": pipeline.status,
            "error": pipeline.error,
            "warnings": list(pipeline.warnings),
            "requirements": pipeline.requirements.name if pipeline.requirements else None,
            "requirements_hash": pipeline.requirements_hash,
            "environment": _env_state(env, pipeline),
            "secrets": {s: s in stored for s in (config.secrets if config else [])},
            "schedule": config.schedule_spec() if config else None,
            "config": config.model_dump(mode="json") if config else None,
            **{k: row[k] for k in ("total_runs", "successful_runs", "failed_runs", "webhook_runs")},
            "last_cache_warmup": row["last_cache_warmup"],
            "setup_duration_s": row["setup_duration_s"],
        }
    if json_out:
        print_json(data)
        return
    shown = {**data, "secrets": _secret_list(data["secrets"]), "config": None}
    console.print(key_values([(k, v) for k, v in shown.items() if k != "config"]))
    if config is not None:
        console.print_json(data=data["config"])


@pipelines_app.command("sync")
def sync_pipelines(json_out: JsonFlag = False) -> None:
    """Re-read CONVEYOR_PIPELINES_DIR into the pipelines table (workers also do on start)."""
    from domain.pipelines import store as pipeline_store

    with _env() as env:
        directory = env.directory()
        report = pipeline_store.sync(env.engine, directory)
        from scheduler.declared import sync_pipeline_schedules

        disabled = sync_pipeline_schedules(env.engine, directory)
    if json_out:
        print_json(report.to_dict())
        return
    console.print(
        f"{directory.root}: {len(report.added)} added, {len(report.updated)} updated, "
        f"{len(report.invalid)} invalid, {len(report.missing)} gone"
    )
    for name in report.invalid:
        console.print(f"  [red]invalid[/] {name}: see `conveyor pipelines show {name}`")
    for name in disabled:
        console.print(f"  schedule {name} disabled: no longer in its pipeline.json")


@pipelines_app.command()
def warm(
    name: Annotated[str | None, typer.Argument(help="Only this pipeline (default: all).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Build environments ahead of the first run; records last_cache_warmup and setup time."""
    from domain.clock import utc_now
    from domain.errors import ConveyorError
    from domain.pipelines import store as pipeline_store

    results: list[dict[str, Any]] = []
    with _env() as env:
        directory, envs = env.directory(), env.envs()
        pipeline_store.sync(env.engine, directory)
        targets = [directory.get(name)] if name else directory.all()
        for pipeline in targets:
            if not pipeline.runnable:
                if name:
                    pipeline.require_runnable()  # the error, naming why
                continue
            config = pipeline.require_runnable()

            def say(message: str, level: str = "info", label: str = pipeline.name) -> None:
                if not json_out:
                    console.print(f"[dim]{label}:[/] {message}", markup=True)

            try:
                info = envs.ensure(pipeline.requirements, config.python_version, log=say)
            except ConveyorError as exc:
                results.append({"name": pipeline.name, "ok": False, "error": str(exc)})
                continue
            pipeline_store.record_env(
                env.engine,
                pipeline.name,
                env_hash=info.env_hash,
                setup_s=info.setup_s,
                now=utc_now(),
                warmup=True,
            )
            results.append(
                {
                    "name": pipeline.name,
                    "ok": True,
                    "environment": "bare interpreter" if info.env_hash is None else "uv venv",
                    "built": info.built,
                    "setup_s": round(info.setup_s, 3),
                }
            )
    if json_out:
        print_json(results)
    else:
        for r in results:
            state = (
                f"[green]ready[/] ({r['environment']}, {r['setup_s']}s)"
                if r["ok"]
                else f"[red]failed[/]: {r['error']}"
            )
            console.print(f"{r['name']}: {state}")
    if any(not r["ok"] for r in results):
        raise typer.Exit(1)


def _status(row: dict[str, Any]) -> str:
    if row["error"]:
        return "invalid"
    return "enabled" if row["enabled"] else "disabled"


def _env_state(env: _Env, pipeline: Any) -> str:
    if pipeline is None or pipeline.config is None:
        return "-"
    if pipeline.requirements is None:
        return "bare"
    from domain.errors import ConveyorError

    try:
        ready = env.envs().is_ready(pipeline.requirements, pipeline.config.python_version)
    except ConveyorError as exc:
        return f"unavailable: {exc}"
    return "ready" if ready else "not built"


def _secret_list(secrets: dict[str, bool]) -> str:
    return ", ".join(f"{k}" + ("" if ok else " (not stored!)") for k, ok in secrets.items()) or "-"


# -- secrets --------------------------------------------------------------------------------
@secrets_app.command("set")
def set_secret(
    name: Annotated[str, typer.Argument(help="Becomes the environment variable's name.")],
    parameter: Annotated[
        bool, typer.Option("--parameter", help="A plain setting: injected but not masked.")
    ] = False,
) -> None:
    """Store a secret; the value is read from stdin, or asked for without echo."""
    from domain.security.secrets import check_name

    check_name(name)
    value = _read_value(name)
    with _env() as env:
        created = env.secrets().set(name, value, is_parameter=parameter)
    kind = "parameter" if parameter else "secret"
    console.print(f"{kind} {name} {'stored' if created else 'updated'}")


def _read_value(name: str) -> str:
    if sys.stdin is not None and not sys.stdin.isatty():
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
    else:
        value = typer.prompt(f"value of {name}", hide_input=True, confirmation_prompt=True)
    if not value:
        raise InvalidInput("secret value: empty (pipe it on stdin or type it at the prompt)")
    return value


@secrets_app.command("list")
def list_secrets(json_out: JsonFlag = False) -> None:
    """Names only (and whether each is a parameter): values are never shown."""
    with _env() as env:
        items = env.secrets().list_all()
    if json_out:
        print_json([item.to_dict() for item in items])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "KIND", "UPDATED"):
        table.add_column(column)
    for item in items:
        kind = "parameter" if item.is_parameter else "secret"
        table.add_row(item.name, kind, item.updated_at.isoformat(timespec="seconds"))
    console.print(table)


@secrets_app.command("rm")
def remove_secret(name: Annotated[str, typer.Argument(help="The secret to delete.")]) -> None:
    """Delete a secret (pipelines that name it then fail with a clear error)."""
    with _env() as env:
        env.secrets().remove(name)
    console.print(f"secret {name} removed")


@secrets_app.command()
def rotate() -> None:
    """Re-encrypt every secret with the first key of CONVEYOR_SECRET_KEY (new key first, old
    key after it, comma-separated; drop the old one once this has run)."""
    with _env() as env:
        count = env.secrets().rotate()
    console.print(f"{count} secret(s) re-encrypted with the current key")


__all__ = ["pipelines_app", "register", "secrets_app"]
