"""The failed-auth brake of a real `conveyor api` process: X-Forwarded-For is believed only
from CONVEYOR_TRUSTED_PROXIES (uvicorn believes 127.0.0.1 by default), so rotating it from
loopback does not escape the brake, and a valid token is served whatever the brake holds."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine

from domain.db.unit_of_work import UnitOfWork
from domain.security import tokens as auth
from tests.e2e.stack import Stack

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

RUNS = "/api/v1/runs"
#: ApiOptions.auth_block_after: failures of one address before it is blocked.
BLOCK_AFTER = 20


@pytest.fixture
def token(pg_url: str) -> str:
    engine = create_engine(pg_url)
    try:
        return auth.create_token(UnitOfWork(engine), "ops", "readonly", actor="test")[1]
    finally:
        engine.dispose()


@pytest.fixture
def stack(pg_url: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(pg_url, tmp_path, "memory://")
    yield s
    s.stop_all()


def fail_many(api: str, forwarded_for: list[str]) -> list[int]:
    """One bad token per entry, each from the X-Forwarded-For given, all at once (the brake
    delays failures past the fifth: in a row they would take half a minute)."""

    def attempt(n: int) -> int:
        headers = {
            "Authorization": f"Bearer cvy_{n:04d}-guess-not-a-token",
            "X-Forwarded-For": forwarded_for[n],
        }
        return httpx.get(f"{api}{RUNS}", headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(len(forwarded_for)) as pool:
        return list(pool.map(attempt, range(len(forwarded_for))))


def get(api: str, token: str, forwarded_for: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": forwarded_for}
    return httpx.get(f"{api}{RUNS}", headers=headers, timeout=30)


def test_rotating_x_forwarded_for_from_loopback_does_not_escape_the_brake(
    stack: Stack, token: str
) -> None:
    api = stack.api()
    rotated = [f"203.0.113.{n}" for n in range(BLOCK_AFTER)]
    assert fail_many(api, rotated) == [401] * BLOCK_AFTER
    refused = get(api, "cvy_guess-after-the-block", "198.51.100.1")
    assert refused.status_code == 429, refused.text
    assert "from this address" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) > 0
    # The brake never holds back a token that authenticates.
    assert get(api, token, "198.51.100.2").status_code == 200


def test_x_forwarded_for_is_believed_from_a_trusted_proxy(stack: Stack, token: str) -> None:
    stack.env["CONVEYOR_TRUSTED_PROXIES"] = "127.0.0.1"
    api = stack.api(name="api-behind-proxy")
    client = "203.0.113.7"
    assert fail_many(api, [client] * BLOCK_AFTER) == [401] * BLOCK_AFTER
    assert get(api, "cvy_guess-after-the-block", client).status_code == 429
    assert get(api, "cvy_guess-elsewhere-1", "203.0.113.8").status_code == 401  # another client
    assert get(api, token, client).status_code == 200
