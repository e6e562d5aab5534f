"""conveyor: durable background work on Celery + Redis with PostgreSQL as the truth."""

from conveyor.client import Client
from domain.errors import (
    Conflict,
    ConveyorError,
    InvalidInput,
    NotFound,
    RunNotFound,
    UnknownTask,
    WaitTimeout,
)
from domain.flow.concurrency import Limit
from domain.runs.views import RunView
from domain.tasks.registry import cron, every, task

__all__ = [
    "Client",
    "Conflict",
    "ConveyorError",
    "InvalidInput",
    "Limit",
    "NotFound",
    "RunNotFound",
    "RunView",
    "UnknownTask",
    "WaitTimeout",
    "cron",
    "every",
    "task",
]
