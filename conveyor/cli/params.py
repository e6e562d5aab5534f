"""Turning command-line text into run parameters and durations, with errors that name the flag."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer

from domain.errors import InvalidInput

AllowUnknown = Annotated[
    bool,
    typer.Option(
        "--allow-unknown",
        help="Accept a task no worker has published yet (its params are checked when it runs).",
    ),
]


def parse_params(pairs: list[str], params_json: str | None) -> dict[str, Any]:
    """`--params-json '{...}'` first, then each `-p key=value` on top of it.

    A value that parses as JSON keeps its type (`-p n=7` is the number 7, `-p ok=true` a bool);
    anything else is a string (`-p name=world`).
    """
    params: dict[str, Any] = {}
    if params_json is not None:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"--params-json: not valid JSON: {exc}", field="params") from None
        if not isinstance(loaded, dict):
            raise InvalidInput(
                f"--params-json: must be a JSON object like '{{\"key\": 1}}', "
                f"got {type(loaded).__name__}",
                field="params",
            )
        params.update(loaded)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"-p {pair!r}: expected key=value", field="params")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[key.strip()] = value
    return params


def wait_seconds(value: float) -> float:
    """`--timeout` of `--wait`: zero or more seconds (zero: look once)."""
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(
            f"--timeout: expected zero or more seconds to wait (got {value:g})", field="timeout"
        )
    return value
