"""The environment of a pipeline run, and the order its layers are applied in (later wins):

    defaults < pipeline env (`default_env`, then `encrypted_env`) < secrets (named in `secrets`)
             < per-run env overrides (params key `_env`) < parameters (scalar params)

then conveyor's own `CONVEYOR_*` run variables, which nothing overrides. "defaults" are the few
variables a worker passes on (PATH, HOME, locale, proxies, CA bundles) plus
PYTHONUNBUFFERED=1 and PYTHONIOENCODING=utf-8; the worker's own settings never reach a pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from domain.errors import InvalidInput
from domain.pipelines.config import ENV_NAME, env_text, is_scalar

#: params key holding per-run environment overrides (an object of strings)
RUN_ENV_KEY = "_env"
#: conveyor's own variables: set last, so neither pipeline.json nor params can fake them
RESERVED_ENV_PREFIX = "CONVEYOR_"


def params_env(params: Mapping[str, Any]) -> dict[str, str]:
    """Scalar params whose names are valid variable names, as environment variables."""
    return {
        key: "" if value is None else env_text(value)
        for key, value in params.items()
        if key != RUN_ENV_KEY and re.match(ENV_NAME, key) and (value is None or is_scalar(value))
    }


def run_env_overrides(params: Mapping[str, Any]) -> dict[str, str]:
    """The per-run overrides in params[`_env`]; anything but an object of scalars is refused."""
    raw = params.get(RUN_ENV_KEY)
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and re.match(ENV_NAME, k) and is_scalar(v) for k, v in raw.items()
    ):
        raise InvalidInput(
            f"params.{RUN_ENV_KEY}: expected an object of environment variable names to strings",
            field=f"params.{RUN_ENV_KEY}",
        )
    return {k: env_text(v) for k, v in raw.items()}


def compose_env(
    *,
    defaults: Mapping[str, str],
    pipeline_env: Mapping[str, str],
    secrets: Mapping[str, str],
    overrides: Mapping[str, str],
    params: Mapping[str, str],
    reserved: Mapping[str, str],
) -> dict[str, str]:
    """The child's environment, later layers winning (see the module docstring)."""
    env: dict[str, str] = {}
    for layer in (defaults, pipeline_env, secrets, overrides, params):
        env.update({k: v for k, v in layer.items() if not k.startswith(RESERVED_ENV_PREFIX)})
    env.update(reserved)
    return env


def pipeline_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params the pipeline itself sees (stdin and CONVEYOR_PARAMS): all but `_env`."""
    return {k: v for k, v in params.items() if k != RUN_ENV_KEY}
