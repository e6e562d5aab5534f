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
from domain.registry import cron, every, task
from domain.views import RunView

__all__ = [
    "Client",
    "Conflict",
    "ConveyorError",
    "InvalidInput",
    "NotFound",
    "RunNotFound",
    "RunView",
    "UnknownTask",
    "WaitTimeout",
    "cron",
    "every",
    "task",
]
