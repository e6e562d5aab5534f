"""The task catalog: which tasks exist and what their runs need, kept in the database.

Workers publish the tasks they import (`publish`) when they start and again about once a
minute, which rewrites only what is missing or changed and marks the rest as still served.
Producers that do not import the task code (the CLI, the API, webhooks, schedules,
conveyor.submit on a worker without the module) resolve names through `TaskTableCatalog`: the
params are checked against the task's JSON Schema and the run gets the task's queue, priority,
attempts and timeout, exactly as a producer that imports the module does.
"""

from __future__ import annotations

import difflib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import Engine, Table, select, update

from domain.db import sql
from domain.db.models_platform import CatalogTask
from domain.errors import UnknownTask
from domain.pipelines.discovery import pipeline_catalog_for
from domain.pipelines.reads import TableCatalog
from domain.ports import Catalog, OpenCatalog, TargetDefaults
from domain.runs.chains import check_chains
from domain.settings import Settings
from domain.tasks.params_schema import check_params, fingerprint
from domain.tasks.registry import REGISTRY, Registry, RegistryCatalog, TaskSpec, import_task_modules

log = structlog.get_logger("conveyor.catalog")

task_catalog = cast(Table, CatalogTask.__table__)

#: A task no worker has refreshed for this long gets a warning when it is enqueued.
STALE_AFTER = timedelta(minutes=5)
#: How often a worker publishes its tasks again (marking them served: `last_seen_at`).
REFRESH_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One row of the catalog, as producers use it."""

    name: str
    version: str
    params_schema: dict[str, Any]
    options: dict[str, Any]
    module: str | None
    registered_by: str | None
    last_seen_at: datetime

    @property
    def defaults(self) -> TargetDefaults:
        o = self.options
        return TargetDefaults(
            kind="task",
            queue=o.get("queue"),
            priority=o.get("priority"),
            max_attempts=o.get("max_attempts"),
            timeout_s=o.get("timeout_s"),
            concurrency_max=(o.get("concurrency") or {}).get("max"),
            concurrency_key=(o.get("concurrency") or {}).get("key"),
            rate_limit=o.get("rate_limit"),
        )

    def stale(self, now: datetime) -> bool:
        return now - self.last_seen_at > STALE_AFTER


def row_for(spec: TaskSpec) -> dict[str, Any]:
    """What a worker publishes for one of its tasks (without the times and the owner)."""
    options = {
        "queue": spec.queue,
        "priority": spec.priority,
        "max_attempts": spec.max_attempts,
        "timeout_s": spec.timeout_s,
        "retry": {"base_s": spec.retry.base_s, "max_s": spec.retry.max_s},
        "schedule": asdict(spec.schedule) if spec.schedule is not None else None,
        "on_success": spec.on_success,
        "on_failure": spec.on_failure,
    }
    if spec.concurrency is not None:  # only then: other tasks keep the version they had
        options["concurrency"] = spec.concurrency.to_dict()
    if spec.rate_limit is not None:
        options["rate_limit"] = spec.rate_limit
    schema = spec.params_schema
    return {
        "name": spec.name,
        "version": fingerprint({"params_schema": schema, "options": options}),
        "params_schema": schema,
        "options": options,
        "module": getattr(spec.fn, "__module__", None),
    }


def publish(engine: Engine, specs: Iterable[TaskSpec], *, owner: str, now: datetime) -> int:
    """Write this worker's tasks into the catalog; returns how many rows were new or changed.

    A row whose version (params schema and options) is unchanged only gets `last_seen_at`;
    a changed one is rewritten, so the newest code that started decides what producers check.
    """
    rows = [row_for(spec) for spec in specs]
    if not rows:
        return 0
    names = [r["name"] for r in rows]
    with engine.begin() as conn:
        current = dict(
            conn.execute(
                select(task_catalog.c.name, task_catalog.c.version).where(
                    task_catalog.c.name.in_(names)
                )
            ).all()
        )
        changed = [r for r in rows if current.get(r["name"]) != r["version"]]
        for row in changed:
            values = {**row, "registered_by": owner, "updated_at": now, "last_seen_at": now}
            insert = sql.insert(conn, task_catalog).values(registered_at=now, **values)
            conn.execute(insert.on_conflict_do_update(index_elements=["name"], set_=values))
        same = [r["name"] for r in rows if current.get(r["name"]) == r["version"]]
        if same:
            _touch(conn, same, now)
    if changed:
        log.info("catalog.published", owner=owner, changed=[r["name"] for r in changed])
    return len(changed)


def _touch(conn: Any, names: Sequence[str], now: datetime) -> None:
    conn.execute(
        update(task_catalog).where(task_catalog.c.name.in_(list(names))).values(last_seen_at=now)
    )


def load(engine: Engine) -> dict[str, CatalogEntry]:
    """The whole catalog, by name (tens or hundreds of rows)."""
    columns = [c for c in task_catalog.c if c.name not in {"registered_at", "updated_at"}]
    with engine.connect() as conn:
        return {row.name: CatalogEntry(**row._mapping) for row in conn.execute(select(*columns))}


class TaskTableCatalog(Catalog):
    """Resolves task names from the catalog table, cached for `ttl_s`; a name not in the cache
    is looked up again (at most every `miss_s`), so a task a worker just published is found."""

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        *,
        ttl_s: float = 5.0,
        miss_s: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self.ttl_s, self.miss_s = ttl_s, miss_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._entries: dict[str, CatalogEntry] = {}
        self._loaded_at = float("-inf")

    def _load(self, max_age_s: float) -> dict[str, CatalogEntry]:
        with self._lock:
            if self._monotonic() - self._loaded_at > max_age_s:
                engine = self._engine if isinstance(self._engine, Engine) else self._engine()
                self._entries = load(engine)
                self._loaded_at = self._monotonic()
            return self._entries

    def find(self, name: str) -> CatalogEntry | None:
        entry = self._load(self.ttl_s).get(name)
        if entry is None:
            entry = self._load(self.miss_s).get(name)
        return entry

    def resolve(self, name: str, params: dict[str, Any]) -> tuple[TargetDefaults, dict[str, Any]]:
        entry = self.find(name)
        if entry is None:
            raise UnknownTask(f"no task named {name!r} in the catalog", name=name)
        return entry.defaults, check_params(entry.params_schema, params)

    def names(self) -> list[str]:
        return sorted(self._load(self.ttl_s))


class CompositeCatalog(Catalog):
    """Tries each catalog in turn (the imported tasks, the catalog table, pipelines); a name
    none of them knows is an UnknownTask that lists the names they do know, closest first."""

    def __init__(self, *catalogs: Catalog) -> None:
        self.catalogs = catalogs

    def resolve(self, name: str, params: dict[str, Any]) -> tuple[TargetDefaults, dict[str, Any]]:
        for catalog in self.catalogs:
            try:
                return catalog.resolve(name, params)
            except UnknownTask:
                continue
        raise unknown_task(name, self.names())

    def names(self) -> list[str]:
        found: set[str] = set()
        for catalog in self.catalogs:
            names = getattr(catalog, "names", None)
            if names is not None:
                found.update(names())
        return sorted(found)


def unknown_task(name: str, known: Sequence[str], *, shown: int = 20) -> UnknownTask:
    """`no task or pipeline named 'helo' (known: hello, help, ...)`, closest names first."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    ordered = close + [n for n in sorted(known) if n not in close]
    listed = ", ".join(ordered[:shown]) + (", ..." if len(ordered) > shown else "")
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UnknownTask(
        f"no task or pipeline named {name[:200]!r}{hint} (known: {listed or 'none'}; "
        "a worker publishes its tasks when it starts)",
        name=name,
        known=ordered[:shown],
    )


def permissive(catalog: Catalog) -> Catalog:
    """`catalog`, but a name it does not know is accepted as given (`allow_unknown`): the run
    waits for a worker that has the task, which checks the params when it claims the run."""
    return CompositeCatalog(catalog, OpenCatalog())


def producer_catalog(
    settings: Settings, engine: Engine, *, registry: Registry = REGISTRY
) -> CompositeCatalog:
    """How every producer resolves a name: the tasks this process imports
    (CONVEYOR_TASK_MODULES, if any), then the catalog the workers published, then the pipelines
    of CONVEYOR_PIPELINES_DIR here, then the pipelines the workers discovered."""
    import_task_modules(settings.task_module_list)
    catalogs: list[Catalog] = []
    if len(registry):
        check_chains(registry)
        catalogs.append(RegistryCatalog(registry))
    catalogs.append(TaskTableCatalog(engine))
    local = pipeline_catalog_for(settings)
    if local.directory.all():
        catalogs.append(local)
    catalogs.append(TableCatalog(engine, None))
    return CompositeCatalog(*catalogs)
