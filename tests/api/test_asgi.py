"""api.asgi.create_app: the API built from the environment, for `uvicorn --factory`."""

from __future__ import annotations

import pytest
from anyio.from_thread import start_blocking_portal

from api.asgi import create_app
from tests.api.conftest import SECRET_KEY, ApiClient


def test_the_factory_serves_the_api_from_the_environment(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", db_url)
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "memory://")
    monkeypatch.setenv("CONVEYOR_SECRET_KEY", SECRET_KEY)
    app = create_app()
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
    ):
        client = ApiClient(app, portal)
        try:
            assert client.get("/readyz").status_code == 200
            assert client.get("/api/v1/runs").status_code == 401  # tokens, as `conveyor api`
        finally:
            client.close()
