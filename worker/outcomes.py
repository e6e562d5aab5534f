"""What one delivery of a run did (Outcome), how a failure is recorded, and the backoff
between attempts."""

from __future__ import annotations

import json
import random
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from domain.errors import (
    ConveyorError,
    safe_str,
)
from domain.security.masking import NO_SECRETS, Masker
from domain.tasks.registry import RetryPolicy

MAX_ERROR_CHARS = 20_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery did: `dropped` (not ours), `lease_lost`, `retrying`, `held` (its project
    is at a monthly limit and holds runs; still pending), or a final status.

    A failed attempt carries its error (masked, as recorded) and, when it is retried, the
    delay before the next one: the Celery task's state tells them (worker/task_states.py)."""

    run_id: uuid.UUID
    status: str
    attempt: int = 0
    error_type: str | None = None
    error: str | None = None
    retry_in_s: float | None = None


@dataclass
class Failure:
    error_type: str
    error: str


def backoff_s(policy: RetryPolicy, attempt: int) -> float:
    """base · 2^(attempt-1) capped at max, then "equal jitter": half fixed, half random, so
    retries of many runs that failed together spread out but never come back at once."""
    exact = getattr(policy, "delay_s", None)  # a pipeline's fixed or custom delays
    if exact is not None:
        return float(exact(attempt))
    ceiling = min(policy.max_s, policy.base_s * 2.0 ** (attempt - 1))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


def describe_failure(error: BaseException, mask: Masker = NO_SECRETS) -> Failure:
    message = safe_str(error)
    if isinstance(error, ConveyorError) and error.self_explanatory and message:
        return Failure(type(error).__qualname__, mask(message)[:MAX_ERROR_CHARS])
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    detail = mask(f"{message}\n\n{text}" if message else text)  # before it is cut short
    if len(detail) > MAX_ERROR_CHARS:
        detail = detail[:MAX_ERROR_CHARS] + f"\n…[truncated {len(detail) - MAX_ERROR_CHARS} chars]"
    return Failure(type(error).__qualname__, detail)


def json_result(result: Any) -> Any:
    """The task's return value as stored JSON; anything JSON cannot hold is a clear error."""
    if result is None:
        return None
    try:
        return json.loads(json.dumps(result, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the task returned {type(result).__name__}, which is not JSON ({exc}); "
            "return dicts, lists, strings, numbers, booleans or None"
        ) from None
