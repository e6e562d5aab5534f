"""`pipeline.json`: the Fast-Flow keys, their meanings, and errors that name file, key, expected.

A folder written for Fast-Flow runs unchanged: every key below keeps the meaning it has there.
Keys Fast-Flow knows but conveyor does not implement, and keys nobody knows, are warnings (the
pipeline still runs); a known key with a bad value disables that pipeline with one message per
problem, e.g. `pipelines/etl/pipeline.json: key 'timeout': expected a number of seconds >= 0
(0 = no timeout); got -5`. The environment a run gets is composed in domain/pipelines/env.py.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    Field,
    ValidationError,
    field_serializer,
    field_validator,
)

from domain.pipelines.retry import (
    CustomSchedule,
    ExponentialBackoff,
    FixedDelay,
    RetryStrategy,
    StrategyRetryPolicy,
    Strict,
)
from domain.runs.requests import NAME_PATTERN
from domain.security.masking import MASK

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"

#: Fast-Flow keys that conveyor reads but does not act on: a warning, never a failure. The
#: compatibility table in pipelines/README.md quotes these reasons (a test holds them equal).
FASTFLOW_UNSUPPORTED = {
    "schedules": "one schedule per pipeline: use the top-level schedule_* keys",
    "restart_on_crash": "daemon restarts are not supported",
    "restart_cooldown": "daemon restarts are not supported",
    "restart_interval": "daemon restarts are not supported",
}
_TRIGGER_UNSUPPORTED = {
    "on_route": "route-based triggers (FASTFLOW_ROUTE_FILE) are not supported; "
    "use on_success and on_failure",
    "run_config_id": "run configurations (Fast-Flow's `schedules`) are not supported",
}
#: Names people bring from other schedulers (Airflow's retries/retry_delay, a notebook cell's
#: delay_seconds), pointed at Fast-Flow's own key.
_MISTAKEN = {
    "retries": "retry_attempts",
    "max_retries": "retry_attempts",
    "retry_delay": "retry_strategy",
    "delay_seconds": "retry_strategy",
}

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-]+$")
MIN_MEMORY = 1024**2


def parse_memory(value: Any) -> int:
    """`512M`, `1G`, `1.5g`, `800m` or a number of bytes → bytes (k/m/g/t are powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int | float):
        amount = float(value)
    else:
        match = _MEMORY.match(str(value))
        if not match:
            raise ValueError("not a size")
        amount = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(amount) or amount < MIN_MEMORY:
        raise ValueError("below 1M")
    return int(amount)


def _memory(value: Any) -> Any:
    return None if value is None else parse_memory(value)


def _iso(value: Any) -> Any:
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("not a date")
    return datetime.fromisoformat(value.strip().replace("Z", "+00:00"))


class DownstreamTrigger(Strict):
    pipeline: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    on_success: bool = True
    on_failure: bool = False


class CellRetry(Strict):
    """One item of `cells`: how a notebook's code cell is retried in place, in the same kernel."""

    retries: int = Field(0, ge=0, le=99)  # tries after the first
    delay_seconds: float = Field(1.0, ge=0, le=3600)


class PipelineConfig(Strict):
    """pipeline.json, every key optional. Defaults are Fast-Flow's."""

    enabled: bool = True
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    type: Literal["script", "notebook"] = "script"
    #: notebook pipelines: item i is for the i-th *code* cell (markdown cells are not counted)
    cells: list[CellRetry] = Field(default_factory=list)
    # Any major.minor[.patch]: whether this worker has it is the environment's question (uv's).
    python_version: str | None = Field(None, pattern=r"^\d{1,2}\.\d{1,3}(\.\d{1,3})?$")
    timeout: float = Field(0, ge=0)
    retry_attempts: int = Field(0, ge=0, le=99)
    retry_strategy: RetryStrategy | None = None
    cpu_hard_limit: float | None = Field(None, gt=0)
    mem_hard_limit: int | None = None
    cpu_soft_limit: float | None = Field(None, gt=0)
    mem_soft_limit: int | None = None
    default_env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = Field(default_factory=dict)
    secrets: list[Annotated[str, Field(pattern=ENV_NAME, max_length=200)]] = Field(
        default_factory=list
    )
    # Fernet tokens, opened at discovery (domain/pipelines/encrypted_env.py); never in a repr,
    # and serialized as names only, so no stored copy of the config holds a token.
    encrypted_env: dict[
        Annotated[str, Field(pattern=ENV_NAME)], Annotated[str, Field(min_length=1)]
    ] = Field(default_factory=dict, repr=False)
    max_instances: int | None = Field(None, ge=1)
    schedule_cron: str | None = None
    schedule_interval_seconds: int | None = Field(None, gt=0)
    schedule_start: datetime | None = None
    schedule_end: datetime | None = None
    run_once_at: datetime | None = None
    timezone: str | None = None
    webhook_key: str | None = Field(None, min_length=1)
    downstream_triggers: list[DownstreamTrigger] = Field(default_factory=list)
    # conveyor's own additions (Fast-Flow has a single queue)
    queue: str | None = Field(None, min_length=1, max_length=100, pattern=NAME_PATTERN)
    priority: int | None = Field(None, ge=0, le=9)

    _mem = field_validator("mem_hard_limit", "mem_soft_limit", mode="before")(_memory)
    _dates = field_validator("schedule_start", "schedule_end", "run_once_at", mode="before")(_iso)

    @field_validator("default_env", mode="before")
    @classmethod
    def _env_scalars(cls, value: Any) -> Any:
        """Numbers and booleans are written as JSON writes them; objects stay an error."""
        if not isinstance(value, dict):
            return value
        return {k: env_text(v) if is_scalar(v) else v for k, v in value.items()}

    @field_serializer("encrypted_env")
    def _names_only(self, value: dict[str, str]) -> dict[str, str]:
        return dict.fromkeys(value, MASK)

    @field_validator("schedule_cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            parts = value.split()
            if len(parts) != 5 or not all(_CRON_FIELD.match(p) for p in parts):
                raise ValueError("not a cron expression")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError("unknown timezone") from None
        return value

    # -- what the rest of conveyor reads ---------------------------------------------------
    @property
    def max_attempts(self) -> int:
        # As in Fast-Flow, a notebook is retried cell by cell (`cells`), never as a whole run.
        return 1 if self.type == "notebook" else self.retry_attempts + 1

    @property
    def timeout_s(self) -> float | None:
        return self.timeout or None  # 0 = no timeout

    @property
    def retry_policy(self) -> StrategyRetryPolicy:
        return StrategyRetryPolicy.from_strategy(self.retry_strategy)

    def schedule_spec(self) -> dict[str, Any] | None:
        """What the scheduler turns into a schedule: cron wins over interval (as in Fast-Flow)."""
        tz = self.timezone or "UTC"
        window = {"start_at": self.schedule_start, "end_at": self.schedule_end, "timezone": tz}
        if self.schedule_cron:
            return {"trigger": "cron", "expression": self.schedule_cron, **window}
        if self.schedule_interval_seconds:
            return {"trigger": "interval", "expression": str(self.schedule_interval_seconds)}
        if self.run_once_at:
            return {"trigger": "once", "expression": self.run_once_at.isoformat(), **window}
        return None


@dataclass(frozen=True)
class ParsedConfig:
    config: PipelineConfig | None
    error: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)


# Human wording of what each key expects, used in error messages.
EXPECTED = {
    "enabled": "true or false",
    "description": "a string",
    "tags": "a list of strings",
    "type": '"script" or "notebook"',
    "cells": 'a list of {"retries": whole number 0-99, "delay_seconds": seconds >= 0}, '
    "one per code cell",
    "python_version": 'a Python version such as "3.11"',
    "timeout": "a number of seconds >= 0 (0 = no timeout)",
    "retry_attempts": "a whole number from 0 to 99",
    "retry_strategy": 'an object with "type": exponential_backoff, fixed_delay or custom_schedule',
    "cpu_hard_limit": "a number of cores > 0, e.g. 0.5 or 2",
    "cpu_soft_limit": "a number of cores > 0, e.g. 0.5 or 2",
    "mem_hard_limit": 'a size like "512M", "1G" or "1.5g" (at least 1M)',
    "mem_soft_limit": 'a size like "512M", "1G" or "1.5g" (at least 1M)',
    "default_env": "an object of environment variable names to strings",
    "secrets": "a list of secret names (letters, digits, _; not starting with a digit)",
    "encrypted_env": "an object of environment variable names to Fernet tokens "
    "(made by `conveyor secrets encrypt`)",
    "max_instances": "a whole number >= 1",
    "schedule_cron": 'a 5-field cron expression such as "0 9 * * *"',
    "schedule_interval_seconds": "a whole number of seconds > 0",
    "schedule_start": 'an ISO date-time such as "2026-01-15T12:00:00"',
    "schedule_end": 'an ISO date-time such as "2026-01-15T12:00:00"',
    "run_once_at": 'an ISO date-time such as "2026-01-15T12:00:00"',
    "timezone": 'an IANA timezone such as "Europe/Berlin"',
    "webhook_key": "a non-empty string",
    "downstream_triggers": 'a list of {"pipeline": name, "on_success": bool, "on_failure": bool}',
    "queue": "a queue name (letters, digits, _ . : -)",
    "priority": "a whole number from 0 to 9",
}


def parse_config(text: str | bytes | None, *, source: str) -> ParsedConfig:
    """Validate pipeline.json text (None: no file, all defaults). Never raises."""
    if text is None:
        return ParsedConfig(PipelineConfig())
    try:
        data = json.loads(text)
    except UnicodeDecodeError:
        return ParsedConfig(None, f"{source}: not UTF-8 text")
    except json.JSONDecodeError as exc:
        return ParsedConfig(
            None, f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        )
    if not isinstance(data, dict):
        got = type(data).__name__
        return ParsedConfig(None, f"{source}: expected a JSON object at the top level; got {got}")
    data, warnings = _split_unknown(data, source)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        return ParsedConfig(None, describe_errors(exc, source), tuple(warnings))
    warnings.extend(_notebook_warnings(config, source))
    if config.webhook_key:
        warnings.append(
            f"{source}: key 'webhook_key' is a legacy trigger (the key travels in the URL); "
            "it is used only when CONVEYOR_PIPELINE_LEGACY_WEBHOOKS is enabled"
        )
    return ParsedConfig(config, None, tuple(warnings))


def _notebook_warnings(config: PipelineConfig, source: str) -> list[str]:
    """Keys that mean nothing for this pipeline's type (Fast-Flow ignores them the same way)."""
    if config.type != "notebook":
        if "cells" in config.model_fields_set:
            return [
                f"{source}: key 'cells' is ignored: it applies to notebook pipelines only "
                '("type": "notebook")'
            ]
        return []
    return [
        f"{source}: key {key!r} is ignored: notebook pipelines are retried cell by cell "
        "(use 'cells' or a cell's metadata.fastflow)"
        for key in ("retry_attempts", "retry_strategy")
        if key in config.model_fields_set
    ]


def _split_unknown(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    known = set(PipelineConfig.model_fields)
    kept: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in data.items():
        if key in known:
            kept[key] = value
        elif key in FASTFLOW_UNSUPPORTED:
            warnings.append(
                f"{source}: key {key!r} is ignored by conveyor: {FASTFLOW_UNSUPPORTED[key]}"
            )
        else:
            hint = [_MISTAKEN[key]] if key in _MISTAKEN else []
            hint = hint or difflib.get_close_matches(key, sorted(known), n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            warnings.append(f"{source}: unknown key {key!r} is ignored{also}")
    triggers = kept.get("downstream_triggers")
    if isinstance(triggers, list):
        cleaned = []
        for i, item in enumerate(triggers):
            if isinstance(item, dict):
                for key in sorted(_TRIGGER_UNSUPPORTED.keys() & item.keys()):
                    warnings.append(
                        f"{source}: key 'downstream_triggers[{i}].{key}' is ignored by "
                        f"conveyor: {_TRIGGER_UNSUPPORTED[key]}"
                    )
                cleaned.append({k: v for k, v in item.items() if k not in _TRIGGER_UNSUPPORTED})
            else:
                cleaned.append(item)
        kept["downstream_triggers"] = cleaned
    return kept, warnings


def describe_errors(exc: ValidationError, source: str) -> str:
    """One `file: key 'k': expected …; got …` clause per problem."""
    seen: set[str] = set()
    clauses = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if p not in _UNION_TAGS]
        key = _key_path(loc)
        if key in seen:  # a union reports each branch; one line per key is enough
            continue
        seen.add(key)
        top = str(loc[0]) if loc else ""
        expected = EXPECTED.get(top, "a valid value")
        if top in _NESTED_MODELS and len(loc) > 1:
            expected = _nested_expected(err, top)
        # An encrypted_env value is never quoted, not even a malformed one: it may be a secret.
        got = _kind(err.get("input")) if top == "encrypted_env" else _short(err.get("input"))
        if err["type"] == "extra_forbidden":
            clauses.append(f"{source}: key {key!r}: not allowed here ({expected})")
        else:
            clauses.append(f"{source}: key {key!r}: expected {expected}; got {got}")
    return "; ".join(clauses)


_UNION_TAGS = {"exponential_backoff", "fixed_delay", "custom_schedule"}
_NESTED_MODELS = {"retry_strategy", "downstream_triggers", "cells"}


def _key_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _nested_expected(err: Any, top: str) -> str:
    if err["type"] == "missing":
        return "this key to be present"
    if err["type"] == "extra_forbidden":
        return f"{top} takes: " + _allowed_keys(top)
    ctx = err.get("ctx") or {}
    simple = {
        "greater_than_equal": f"a number >= {ctx.get('ge')}",
        "greater_than": f"a number > {ctx.get('gt')}",
        "float_type": "a number",
        "int_type": "a whole number",
        "bool_type": "true or false",
        "string_type": "a string",
        "string_pattern_mismatch": "a name of letters, digits and _ . : -",
        "list_type": "a list",
        "too_short": f"at least {ctx.get('min_length')} item(s)",
    }
    if err["type"] in simple:
        return simple[err["type"]]
    msg = str(err["msg"])
    return msg[0].lower() + msg[1:] if msg else EXPECTED.get(top, "a valid value")


def _allowed_keys(top: str) -> str:
    if top == "downstream_triggers":
        return ", ".join(DownstreamTrigger.model_fields)
    if top == "cells":
        return ", ".join(CellRetry.model_fields)
    if top == "retry_strategy":
        names = {
            n for m in (ExponentialBackoff, FixedDelay, CustomSchedule) for n in m.model_fields
        }
        return ", ".join(sorted(names))
    return EXPECTED.get(top, "known keys only")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    names = {str: "a string", bool: "true or false", dict: "an object", list: "a list"}
    return names.get(type(value), "null" if value is None else "a number")


def is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)
