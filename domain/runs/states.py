"""Run states and the rules between them (DESIGN.md, "Run states")."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    #: Between two executions, holding no worker: asleep (`ctx.sleep`) until `not_before`.
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    BUDGET_EXCEEDED = "budget_exceeded"


TERMINAL: frozenset[str] = frozenset(
    {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT, Status.BUDGET_EXCEEDED}
)
ACTIVE: frozenset[str] = frozenset({Status.PENDING, Status.RUNNING, Status.WAITING})
ALL_STATUSES: tuple[str, ...] = tuple(s.value for s in Status)

TRIGGERS: tuple[str, ...] = (
    "api",
    "cli",
    "client",
    "schedule",
    "webhook",
    "celery",
    "retry",
    "chain",
    "manual",
    "spawn",
)


def is_terminal(status: str) -> bool:
    """Terminal states never change again."""
    return status in TERMINAL
