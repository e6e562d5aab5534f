"""What callbacks and notifications carry: the run summary (JSON), a Slack-style text, and the
key they are signed with when no webhook secret applies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from decimal import Decimal
from typing import Any

from domain.errors import ConfigurationError
from domain.runs.states import Status
from domain.runs.views import RunView, jsonable
from domain.security import crypto

SIGNING_CONTEXT = b"conveyor outbound signing key v1"
MAX_ERROR = 500
EMOJI = {
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "cancelled": ":no_entry_sign:",
    "timed_out": ":hourglass:",
    "budget_exceeded": ":money_with_wings:",
}


def signing_key(secret_key: str) -> str:
    """The secret outbound POSTs are signed with, derived from the first (current) key of
    CONVEYOR_SECRET_KEY, so rotating that key rotates this one too."""
    current = next((part.strip() for part in secret_key.split(",") if part.strip()), "")
    if not current:
        raise ConfigurationError(
            "CONVEYOR_SECRET_KEY is not set; callbacks and notifications are signed with a key "
            f"derived from it; {crypto.GENERATE_HINT}",
            field="secret_key",
        )
    digest = hmac.new(current.encode(), SIGNING_CONTEXT, hashlib.sha256).digest()
    return "whsec_" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def summary(run: RunView) -> dict[str, Any]:
    """The JSON a callback or a json-format notification carries."""
    data: dict[str, Any] = {
        "event": "run.finished",
        "id": str(run.id),
        "name": run.name,
        "project": run.project,
        "kind": run.kind,
        "status": run.status,
        "attempt": run.attempt,
        "max_attempts": run.max_attempts,
        "triggered_by": run.triggered_by,
        "created_at": jsonable(run.created_at),
        "started_at": jsonable(run.started_at),
        "finished_at": jsonable(run.finished_at),
        "duration_s": run.duration_s,
        "cost": {
            "usd": f"{Decimal(run.cost_usd or 0).normalize():f}",
            "tokens_in": run.tokens_in,
            "tokens_out": run.tokens_out,
            "requests": run.requests_made,
        },
    }
    if run.status == Status.SUCCEEDED:
        data["result"] = run.result
    else:
        data["error"] = {"type": run.error_type, "message": run.error}
    return data


def slack_message(run: RunView) -> dict[str, Any]:
    """`{"text": ...}` for a Slack (or Mattermost, Rocket.Chat) incoming webhook."""
    took = f", {run.duration_s:.1f}s" if run.duration_s is not None else ""
    text = (
        f"{EMOJI.get(run.status, '')} conveyor run *{run.name}* {run.status} "
        f"(attempt {run.attempt}/{run.max_attempts}{took}, project {run.project})"
    ).strip()
    if run.status != Status.SUCCEEDED and (run.error_type or run.error):
        text += f"\n{run.error_type or 'error'}: {(run.error or '')[:MAX_ERROR]}"
    return {"text": text + f"\nrun {run.id}"}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode()
