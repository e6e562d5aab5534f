"""The status API as an ASGI app factory, for servers that start their own processes:
`uvicorn --factory api.asgi:create_app --workers N` runs N API processes on one port, each
with its own engine, publisher, intake and caches (the failed-auth limiter and the token
cache are per process, as they are with one)."""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_api
from domain.logging import configure_logging
from domain.settings import get_settings


def create_app() -> FastAPI:
    """The API with the environment's settings (CONVEYOR_*), as `conveyor api` builds it."""
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    return create_api(settings)
