"""POST /hooks/{name}: signature and timestamp checks, one run per delivery id (also when
duplicates race), size limits without reading the body, and delivery while Redis is down."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import func, insert, select

from api.options import ApiOptions
from domain.db.models import runs
from domain.db.models_platform import Pipeline
from domain.settings import Settings, load_settings
from domain.tasks.registry import Registry, RegistryCatalog
from domain.webhooks import inbound as webhooks
from tests.api.conftest import ApiClient, error_of, running_api


def signed_headers(
    secret: str, body: bytes, *, delivery: str | None = None, ts: int | None = None
) -> dict[str, str]:
    timestamp = str(int(time.time()) if ts is None else ts)
    return {
        "content-type": "application/json",
        "X-Conveyor-Timestamp": timestamp,
        "X-Conveyor-Delivery": delivery or str(uuid.uuid4()),
        "X-Conveyor-Signature": webhooks.signature(secret, timestamp, body),
    }


def add_hook(api: ApiClient, name: str = "deploy", **body: Any) -> str:
    response = api.as_role(
        "admin", "POST", "/api/v1/webhooks", json={"name": name, "target": "build", **body}
    )
    assert response.status_code == 201, response.text
    secret: str = response.json()["secret"]
    return secret


def count_runs(api: ApiClient) -> int:
    with api.state.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(runs)).scalar_one())


def post(
    api: ApiClient, body: bytes, headers: dict[str, str], hook: str = "deploy"
) -> httpx.Response:
    return api.post(f"/hooks/{hook}", content=body, headers=headers)


@pytest.fixture
def hooked(api: ApiClient) -> Iterator[tuple[ApiClient, str]]:
    yield api, add_hook(api)


def test_a_signed_delivery_creates_one_run_and_a_repeat_returns_it(
    hooked: tuple[ApiClient, str],
) -> None:
    api, secret = hooked
    body = json.dumps({"ref": "main", "sha": "abc"}).encode()
    headers = signed_headers(secret, body, delivery="d-1")
    first = post(api, body, headers)
    assert first.status_code == 202
    run_id = first.json()["run_id"]
    again = post(api, body, signed_headers(secret, body, delivery="d-1"))
    assert again.status_code == 200 and again.json() == {"run_id": run_id}
    run = api.as_role("readonly", "GET", f"/api/v1/runs/{run_id}").json()
    assert run["params"] == {"ref": "main", "sha": "abc"}
    assert (run["name"], run["triggered_by"], run["trigger_ref"]) == (
        "build",
        "webhook",
        "deploy:d-1",
    )
    with api.state.engine.connect() as conn:
        rows = conn.execute(select(webhooks.deliveries)).mappings().all()
    assert [(r["delivery_id"], str(r["run_id"])) for r in rows] == [("d-1", run_id)]
    other_body = json.dumps({"ref": "dev"}).encode()
    reused = post(api, other_body, signed_headers(secret, other_body, delivery="d-1"))
    assert reused.status_code == 409 and "X-Conveyor-Delivery" in error_of(reused)["message"]
    assert count_runs(api) == 1


def test_bad_signatures_and_stale_timestamps_are_401_and_create_nothing(
    hooked: tuple[ApiClient, str],
) -> None:
    api, secret = hooked
    body = b'{"ref": "main"}'
    now = int(time.time())
    tampered = signed_headers(secret, body)
    # The last hex digit changed (setting it to a fixed "00" left 1 signature in 256 valid).
    signature = tampered["X-Conveyor-Signature"]
    tampered["X-Conveyor-Signature"] = signature[:-1] + ("1" if signature[-1] == "0" else "0")
    wrong_secret = signed_headers("whsec_other", body)
    unsigned = signed_headers(secret, body)
    del unsigned["X-Conveyor-Signature"]
    # 10 s past the ±300 s window: `now` is truncated to the second and the requests before
    # these take time, so ±301 could land back inside the window by the time it is checked.
    replayed = signed_headers(secret, body, ts=now - 310)  # a captured delivery, re-sent late
    future = signed_headers(secret, body, ts=now + 310)
    garbage_ts = signed_headers(secret, body)
    garbage_ts["X-Conveyor-Timestamp"] = "yesterday"
    for headers in [tampered, wrong_secret, unsigned, replayed, future, garbage_ts]:
        response = post(api, body, headers)
        assert response.status_code == 401, (headers, response.text)
        assert error_of(response)["type"] in {"bad_signature", "stale_timestamp"}
    body_swapped = post(api, b'{"ref": "evil"}', signed_headers(secret, body))
    assert body_swapped.status_code == 401
    assert count_runs(api) == 0


def test_unknown_hook_bad_bodies_and_missing_delivery_id(hooked: tuple[ApiClient, str]) -> None:
    api, secret = hooked
    body = b"{}"
    unknown = post(api, body, signed_headers(secret, body), hook="nope")
    assert unknown.status_code == 404 and error_of(unknown)["type"] == "webhook_not_found"
    for bad in [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"]:
        response = post(api, bad, signed_headers(secret, bad))
        assert response.status_code == 400, bad
        assert error_of(response)["field"] == "body"
    no_id = signed_headers(secret, body)
    del no_id["X-Conveyor-Delivery"]
    missing = post(api, body, no_id)
    assert missing.status_code == 400 and error_of(missing)["field"] == "X-Conveyor-Delivery"
    assert count_runs(api) == 0


def test_oversized_bodies_are_413_without_reading_them(db_url: str) -> None:
    options = ApiOptions(webhook_max_bytes=1024)
    with running_api(db_url, options=options) as api:
        secret = add_hook(api)
        big = json.dumps({"blob": "x" * 2000}).encode()
        declared = post(api, big, signed_headers(secret, big))
        assert declared.status_code == 413 and error_of(declared)["type"] == "payload_too_large"

        chunks_read = []

        async def stream() -> AsyncIterator[bytes]:
            for i in range(1000):  # 1 MB offered in 1 KB chunks, no Content-Length
                chunks_read.append(i)
                yield b"x" * 1024

        streamed = api.post("/hooks/deploy", content=stream(), headers=signed_headers(secret, b""))
        assert streamed.status_code == 413 and error_of(streamed)["type"] == "payload_too_large"
        assert len(chunks_read) < 10  # it stopped reading right after the limit
        assert count_runs(api) == 0
        small = b'{"ok": true}'
        assert post(api, small, signed_headers(secret, small)).status_code == 202
        metrics = api.get("/metrics").text
        assert 'conveyor_webhook_deliveries_total{outcome="too_large"} 2.0' in metrics


def test_options_follow_settings_fields_of_the_same_name() -> None:
    class WithLimit(Settings):
        webhook_max_bytes: int = 4096

    assert ApiOptions.from_settings(load_settings()) == ApiOptions()
    assert ApiOptions.from_settings(WithLimit()).webhook_max_bytes == 4096


def test_params_are_checked_against_the_target_task(db_url: str) -> None:
    registry = Registry()

    @registry.task(name="build")
    def build(ctx: object, ref: str) -> None: ...

    with running_api(db_url, catalog=RegistryCatalog(registry)) as api:
        secret = add_hook(api)
        body = b'{"branch": "main"}'
        refused = post(api, body, signed_headers(secret, body))
        assert refused.status_code == 422 and error_of(refused)["field"] == "ref"
        ok = b'{"ref": "main"}'
        assert post(api, ok, signed_headers(secret, ok)).status_code == 202


@pytest.mark.postgres
def test_concurrent_duplicates_make_exactly_one_run(pg_api: ApiClient) -> None:
    api = pg_api
    secret = add_hook(api, "pipe", kind="pipeline", target="nightly")
    with api.state.engine.begin() as conn:
        conn.execute(insert(Pipeline.__table__).values(name="nightly", path="/p/nightly"))
    body = b'{"n": 1}'

    def deliver(_: int) -> httpx.Response:
        return post(api, body, signed_headers(secret, body, delivery="same"), hook="pipe")

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(deliver, range(100)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 99 + [202]
    assert len({r.json()["run_id"] for r in responses}) == 1
    assert count_runs(api) == 1
    with api.state.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(webhooks.deliveries)).scalar() == 1
        counted = conn.execute(select(webhooks.pipelines.c.webhook_runs)).scalar_one()
    assert counted == 0  # counted when the run ends, in its final transaction (not yet here)
    metrics = api.get("/metrics").text
    assert 'conveyor_webhook_deliveries_total{outcome="accepted"} 1.0' in metrics
    assert 'conveyor_webhook_deliveries_total{outcome="duplicate"} 99.0' in metrics


def test_a_delivery_while_redis_is_down_still_creates_the_run(db_url: str) -> None:
    from worker.app import create_app
    from worker.publisher import CeleryPublisher

    dead = load_settings(database_url=db_url, broker_url="redis://127.0.0.1:1/0")
    publisher = CeleryPublisher(create_app(dead))
    with running_api(db_url, publisher=publisher) as api:
        secret = add_hook(api)
        body = b'{"ref": "main"}'
        accepted = post(api, body, signed_headers(secret, body))
        assert accepted.status_code == 202
        run = api.as_role("readonly", "GET", f"/api/v1/runs/{accepted.json()['run_id']}").json()
        assert run["status"] == "pending"  # the relay publishes it once Redis is back
