"""The API in-process: a real app (lifespan and all) on the test database, driven over ASGI by
httpx from a blocking portal, so tests stay plain functions."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from cryptography.fernet import Fernet
from fastapi import FastAPI
from sqlalchemy import Engine, insert

from api.app import create_api
from api.state import ApiState
from domain.db.engine import create_db_engine
from domain.db.models import RunArtifact, RunMetric, cost_entries, run_logs, run_steps, runs
from domain.db.unit_of_work import UnitOfWork
from domain.ports import Catalog, OpenCatalog
from domain.security import tokens as auth
from domain.settings import load_settings

SECRET_KEY = Fernet.generate_key().decode()


class ApiClient:
    """Sync calls into the app's event loop; `token=` sets the bearer header."""

    def __init__(
        self, app: FastAPI, portal: BlockingPortal, ip: str = "127.0.0.1", *, crashes: bool = True
    ) -> None:
        self.app = app
        self.portal = portal
        self.ip = ip
        # crashes=False: see the 500 the app sends instead of the exception it re-raises.
        transport = httpx.ASGITransport(app=app, client=(ip, 50000), raise_app_exceptions=crashes)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://api")
        self.tokens: dict[str, str] = {}

    @property
    def state(self) -> ApiState:
        state: ApiState = self.app.state.api
        return state

    def uow(self) -> UnitOfWork:
        return self.state.uow()

    def request(
        self, method: str, url: str, *, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        call = functools.partial(self._client.request, method, url, headers=headers, **kwargs)
        return self.portal.call(call)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def as_role(self, role: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.request(method, url, token=self.tokens[role], **kwargs)

    @contextmanager
    def from_address(self, ip: str, *, crashes: bool = True) -> Iterator[ApiClient]:
        other = ApiClient(self.app, self.portal, ip, crashes=crashes)
        other.tokens = self.tokens
        try:
            yield other
        finally:
            other.close()

    def close(self) -> None:
        self.portal.call(self._client.aclose)


@contextmanager
def running_api(url: str, *, catalog: Catalog | None = None, **create: Any) -> Iterator[ApiClient]:
    """An app on `url` with an admin, a write and a readonly token (client.tokens[role])."""
    settings = load_settings(
        database_url=url,
        broker_url=create.pop("broker_url", "memory://"),
        **create.pop("settings", {}),
    )
    engine = create_db_engine(url)
    app = create_api(
        settings,
        engine=engine,
        catalog=catalog or OpenCatalog(),
        secret_key=create.pop("secret_key", SECRET_KEY),
        **create,
    )
    try:
        with (
            start_blocking_portal() as portal,
            portal.wrap_async_context_manager(app.router.lifespan_context(app)),
        ):
            client = ApiClient(app, portal)
            try:
                for role in auth.ROLES:
                    _, client.tokens[role] = auth.create_token(
                        UnitOfWork(engine), f"{role}-token", role, actor="test"
                    )
                yield client
            finally:
                client.close()
    finally:
        engine.dispose()


@pytest.fixture
def api(db_url: str) -> Iterator[ApiClient]:
    """The API on SQLite and on PostgreSQL."""
    with running_api(db_url) as client:
        yield client


@pytest.fixture
def pg_api(pg_url: str) -> Iterator[ApiClient]:
    with running_api(pg_url) as client:
        yield client


def create_run(client: ApiClient, name: str = "report", **body: Any) -> dict[str, Any]:
    response = client.as_role("write", "POST", "/api/v1/runs", json={"name": name, **body})
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def set_status(engine: Engine, run_id: str, status: str, **values: Any) -> None:
    """What a worker would write: the run's state (tests play the worker)."""
    now = datetime.now(UTC)
    if status != "pending":
        values.setdefault("started_at", now)
    if status not in {"pending", "running"}:
        values.setdefault("finished_at", now)
    with engine.begin() as conn:
        conn.execute(
            runs.update().where(runs.c.id == uuid.UUID(run_id)).values(status=status, **values)
        )


def add_logs(engine: Engine, run_id: str, seqs: range, attempt: int = 1) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "run_id": uuid.UUID(run_id),
            "seq": seq,
            "attempt": attempt,
            "ts": now,
            "stream": "log",
            "level": "info",
            "message": f"line {seq}",
            "fields": {"n": seq},
        }
        for seq in seqs
    ]
    with engine.begin() as conn:
        conn.execute(insert(run_logs), rows)


def add_records(engine: Engine, run_id: str) -> None:
    """Steps, costs, metrics and an artifact, as the SDK records them."""
    rid = uuid.UUID(run_id)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(run_steps),
            [
                {"run_id": rid, "seq": 1, "attempt": 1, "name": "fetch", "status": "completed"},
                {"run_id": rid, "seq": 2, "attempt": 1, "name": "llm", "status": "running"},
            ],
        )
        costs = [("openai", "gpt-4o-mini", "0.00019"), ("openai", "gpt-4o-mini", "0.00021")]
        conn.execute(
            insert(cost_entries),
            [
                {
                    "run_id": rid,
                    "seq": seq,
                    "project": "default",
                    "ts": now,
                    "provider": provider,
                    "model": model,
                    "tokens_in": 900,
                    "tokens_out": 80,
                    "requests": 1,
                    "cost_usd": usd,
                }
                for seq, (provider, model, usd) in enumerate(costs, 1)
            ],
        )
        conn.execute(
            insert(RunMetric.__table__),
            [{"run_id": rid, "ts": now, "name": "rows", "value": 120.0, "labels": {"t": "a"}}],
        )
        conn.execute(
            insert(RunArtifact.__table__),
            [
                {
                    "run_id": rid,
                    "name": "report.csv",
                    "path": "/tmp/report.csv",
                    "size_bytes": 10,
                    "sha256": "0" * 64,
                    "created_at": now,
                }
            ],
        )


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error object, after checking the response has exactly the one shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) <= {"type", "message", "field"}
    assert isinstance(error["type"], str) and isinstance(error["message"], str)
    assert "Traceback" not in response.text
    return error
