"""Registered tasks: `@task` records a function with its defaults and a params model from its
signature, so bad params are refused at enqueue time, before any row is written."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from domain.errors import ConfigurationError, InvalidInput, UnknownTask
from domain.flow import rates
from domain.flow.concurrency import Limit
from domain.ports import Catalog, TargetDefaults
from domain.runs.requests import NAME_PATTERN, invalid_from
from domain.tasks.params_schema import check_params, schema_of

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between attempts: base · 2^(attempt-1), capped, with jitter."""

    base_s: float = 2.0
    max_s: float = 300.0


@dataclass(frozen=True)
class Declared:
    """A schedule declared next to its task: `@task(schedule=cron("*/5 * * * *"))`."""

    trigger: str
    expression: str
    timezone: str = "UTC"
    params: dict[str, Any] = field(default_factory=dict)
    misfire_policy: str = "skip"
    catch_up_limit: int | None = None
    overlap_policy: str = "allow"


def cron(
    expression: str,
    tz: str = "UTC",
    *,
    params: dict[str, Any] | None = None,
    misfire: str = "skip",
    catch_up_limit: int | None = None,
    overlap: str = "allow",
) -> Declared:
    """A crontab schedule (5 fields, or 6 with seconds first) in time zone `tz`."""
    return Declared("cron", expression, tz, params or {}, misfire, catch_up_limit, overlap)


def every(
    interval: str,
    *,
    params: dict[str, Any] | None = None,
    misfire: str = "skip",
    catch_up_limit: int | None = None,
    overlap: str = "allow",
) -> Declared:
    """An interval schedule: `every("30s")`, `every("15m")`."""
    return Declared("interval", interval, "UTC", params or {}, misfire, catch_up_limit, overlap)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    fn: Callable[..., Any]
    params_model: type[BaseModel]
    queue: str = "default"
    max_attempts: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float | None = None
    priority: int | None = None
    schedule: Declared | None = None
    on_success: str | None = None
    on_failure: str | None = None
    concurrency: Limit | None = None
    rate_limit: str | None = None

    @cached_property
    def params_schema(self) -> dict[str, Any]:
        """The params as a JSON Schema: what the catalog publishes for other producers."""
        return schema_of(self.params_model)

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Params checked against the signature, returned JSON-ready (what is stored).

        They are checked against the JSON Schema first, as a producer without the code checks
        them (domain/tasks/catalog.py), so both accept and refuse the same params."""
        return self.parse(check_params(self.params_schema, params)).model_dump(mode="json")

    def parse(self, params: dict[str, Any]) -> BaseModel:
        try:
            return self.params_model.model_validate(params)
        except ValidationError as exc:
            raise invalid_from(exc, prefix="params.") from None

    def call_kwargs(self, params: dict[str, Any]) -> dict[str, Any]:
        """Typed keyword arguments for the function (datetimes as datetimes, and so on)."""
        model = self.parse(params)
        return {name: getattr(model, name) for name in type(model).model_fields}

    @property
    def defaults(self) -> TargetDefaults:
        return TargetDefaults(
            kind="task",
            queue=self.queue,
            priority=self.priority,
            max_attempts=self.max_attempts,
            timeout_s=self.timeout_s,
            concurrency_max=None if self.concurrency is None else self.concurrency.max,
            concurrency_key=None if self.concurrency is None else self.concurrency.key,
            rate_limit=self.rate_limit,
        )


def params_model_for(name: str, fn: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of `fn`'s parameters after the first (`ctx`); unknown keys refused."""
    parameters = list(inspect.signature(fn).parameters.values())
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ConfigurationError(f"task {name!r}: the first parameter must be the context (ctx)")
    hints = inspect.get_annotations(fn, eval_str=True)
    fields: dict[str, Any] = {}
    for p in parameters[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ConfigurationError(
                f"task {name!r}: *args/**kwargs cannot be validated; name them"
            )
        annotation = hints.get(p.name, Any)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=False)
    model: type[BaseModel] = create_model(f"{name}_params", __config__=config, **fields)
    return model


class Registry:
    """Tasks by name. One per process (`REGISTRY`); tests make their own."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}

    def add(self, spec: TaskSpec) -> None:
        existing = self._tasks.get(spec.name)
        if existing is not None and existing.fn is not spec.fn:
            where = f"{existing.fn.__module__}.{existing.fn.__qualname__}"
            raise ConfigurationError(f"task {spec.name!r} is already registered by {where}")
        self._tasks[spec.name] = spec

    def get(self, name: str) -> TaskSpec:
        try:
            return self._tasks[name]
        except KeyError:
            known = ", ".join(sorted(self._tasks)) or "none"
            raise UnknownTask(
                f"no task or pipeline named {name!r} (registered tasks: {known})", name=name
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def specs(self) -> list[TaskSpec]:
        return [self._tasks[name] for name in sorted(self._tasks)]

    def task(
        self,
        name: str | None = None,
        *,
        queue: str = "default",
        max_attempts: int = 1,
        retry_backoff: float = 2.0,
        retry_backoff_max: float = 300.0,
        timeout: float | None = None,
        priority: int | None = None,
        schedule: Declared | None = None,
        on_success: str | None = None,
        on_failure: str | None = None,
        concurrency: Limit | None = None,
        rate_limit: str | None = None,
    ) -> Callable[[F], F]:
        def register(fn: F) -> F:
            task_name = name or fn.__name__
            _check_options(task_name, queue, max_attempts, timeout, priority)
            params_model = params_model_for(task_name, fn)
            if concurrency is not None:
                if not isinstance(concurrency, Limit):
                    raise ConfigurationError(
                        f"task {task_name!r}: concurrency takes a Limit(key=..., max=...), "
                        f"got {concurrency!r}"
                    )
                concurrency.check_params(task_name, params_model.model_fields)
            if rate_limit is not None:
                try:
                    rates.check_name(rate_limit, field="rate_limit")
                except InvalidInput as exc:
                    raise ConfigurationError(f"task {task_name!r}: {exc}") from None
            self.add(
                TaskSpec(
                    name=task_name,
                    fn=fn,
                    params_model=params_model,
                    queue=queue,
                    max_attempts=max_attempts,
                    retry=RetryPolicy(retry_backoff, retry_backoff_max),
                    timeout_s=timeout,
                    priority=priority,
                    schedule=schedule,
                    on_success=on_success,
                    on_failure=on_failure,
                    concurrency=concurrency,
                    rate_limit=rate_limit,
                )
            )
            fn.conveyor_task = task_name  # type: ignore[attr-defined]
            return fn

        return register


def _check_options(
    name: str, queue: str, max_attempts: int, timeout: float | None, priority: int | None
) -> None:
    import re

    if not re.match(NAME_PATTERN, name):
        raise ConfigurationError(f"task name {name!r}: use letters, digits, _ . : -")
    if not re.match(NAME_PATTERN, queue):
        raise ConfigurationError(f"task {name!r}: queue {queue!r} is not a valid queue name")
    if max_attempts < 1:
        raise ConfigurationError(f"task {name!r}: max_attempts must be at least 1")
    if timeout is not None and timeout <= 0:
        raise ConfigurationError(f"task {name!r}: timeout must be positive seconds")
    if priority is not None and not 0 <= priority <= 9:
        raise ConfigurationError(f"task {name!r}: priority must be 0-9")


REGISTRY = Registry()


@overload
def task(fn: F, /) -> F: ...
@overload
def task(
    name: str | None = None,
    *,
    queue: str = "default",
    max_attempts: int = 1,
    retry_backoff: float = 2.0,
    retry_backoff_max: float = 300.0,
    timeout: float | None = None,
    priority: int | None = None,
    schedule: Declared | None = None,
    on_success: str | None = None,
    on_failure: str | None = None,
    concurrency: Limit | None = None,
    rate_limit: str | None = None,
) -> Callable[[F], F]: ...
def task(*args: Any, **kwargs: Any) -> Any:
    """Register a task: `@task` or `@task(name=..., queue=..., max_attempts=..., timeout=...)`."""
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return REGISTRY.task()(args[0])
    return REGISTRY.task(*args, **kwargs)


def import_task_modules(modules: Iterable[str]) -> None:
    """Import the modules named in CONVEYOR_TASK_MODULES; a missing one is a clear error."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigurationError(
                f"CONVEYOR_TASK_MODULES: cannot import {module!r}: {exc}", field="task_modules"
            ) from None


class RegistryCatalog(Catalog):
    """Resolves names against a Registry: unknown tasks and bad params refused up front."""

    def __init__(self, registry: Registry = REGISTRY) -> None:
        self.registry = registry

    def resolve(self, name: str, params: dict[str, Any]) -> tuple[TargetDefaults, dict[str, Any]]:
        spec = self.registry.get(name)
        return spec.defaults, spec.validate(params)

    def names(self) -> list[str]:
        return self.registry.names()


__all__ = [
    "REGISTRY",
    "InvalidInput",
    "Registry",
    "RegistryCatalog",
    "TaskSpec",
    "task",
]
