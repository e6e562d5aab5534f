"""Every 4xx/5xx has one shape, names the field when there is one, and leaks nothing; bad
filters, tampered cursors and malformed ids are refused, never a 500."""

from __future__ import annotations

import base64

import pytest
from fastapi import APIRouter
from sqlalchemy.exc import OperationalError

from domain.errors import DatabaseUnavailable
from tests.api.conftest import ApiClient, create_run, error_of, running_api


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=bogus", "status"),
        ("status=failed&status=nope", "status"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("limit=ten", "limit"),
        ("created_after=yesterday", "created_after"),
        ("created_after=2026-01-01T00:00:00", "created_after"),  # no zone: ambiguous
        ("name=" + "x" * 5000, "name"),
        ("project=" + "p" * 101, "project"),
        ("cursor=" + "c" * 201, "cursor"),
        ("colour=red", "colour"),
    ],
)
def test_bad_filters_are_422_naming_the_field(api: ApiClient, query: str, field: str) -> None:
    response = api.as_role("readonly", "GET", f"/api/v1/runs?{query}")
    assert response.status_code == 422, response.text
    assert error_of(response) | {"message": ""} == {
        "type": "invalid_input",
        "message": "",
        "field": field,
    }


def test_sql_looking_filters_are_only_values(api: ApiClient) -> None:
    create_run(api, "report")
    for value in ["report' OR '1'='1", "report; DROP TABLE runs; --", "%", "' UNION SELECT 1--"]:
        response = api.as_role("readonly", "GET", "/api/v1/runs", params={"name": value})
        assert response.status_code == 200 and response.json()["items"] == []
    assert len(api.as_role("readonly", "GET", "/api/v1/runs").json()["items"]) == 1


@pytest.mark.parametrize(
    "cursor",
    [
        "not-base64!",
        base64.urlsafe_b64encode(b"2026-01-01T00:00:00|not-a-uuid").decode(),
        base64.urlsafe_b64encode(b"2026-01-01T00:00:00|01900000-0000-7000-8000-000000000000")
        .decode()
        .rstrip("="),  # a naive timestamp: not one the server issues
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
        "A" * 199,
    ],
)
def test_tampered_cursor_is_422(api: ApiClient, cursor: str) -> None:
    response = api.as_role("readonly", "GET", "/api/v1/runs", params={"cursor": cursor})
    assert response.status_code == 422
    assert error_of(response)["field"] == "cursor"


@pytest.mark.parametrize(
    "run_id", ["not-a-uuid", "1", "01900000-0000-7000-8000-00000000000Z", "' OR 1=1 --"]
)
def test_a_run_id_that_is_not_a_uuid_is_422(api: ApiClient, run_id: str) -> None:
    for path in [f"/api/v1/runs/{run_id}", f"/api/v1/runs/{run_id}/logs"]:
        response = api.as_role("readonly", "GET", path)
        assert response.status_code == 422
        assert error_of(response)["field"] == "run_id"


def test_unknown_routes_and_methods_use_the_shape(api: ApiClient) -> None:
    missing = api.get("/api/v1/nothing-here")
    assert missing.status_code == 404 and error_of(missing)["type"] == "not_found"
    wrong = api.request("PUT", "/api/v1/runs", token=api.tokens["admin"])
    assert wrong.status_code == 405 and error_of(wrong)["type"] == "method_not_allowed"
    negative = api.as_role(
        "readonly", "GET", "/api/v1/runs/0190a000-0000-7000-8000-0000000000aa/logs?after_seq=-1"
    )
    assert negative.status_code == 422 and error_of(negative)["field"] == "after_seq"


def test_crashes_and_database_outages_say_nothing_internal(db_url: str) -> None:
    boom = APIRouter()

    @boom.get("/boom")
    def crash() -> None:
        raise RuntimeError(f"secret detail from {db_url}")

    @boom.get("/db-down")
    def db_down() -> None:
        raise DatabaseUnavailable("cannot reach the database postgresql://***@db/x: refused")

    @boom.get("/driver")
    def driver() -> None:
        raise OperationalError("SELECT secret", {"password": "hunter2"}, Exception("boom"))

    with running_api(db_url) as api:
        api.app.include_router(boom)
        with api.from_address("127.0.0.1", crashes=False) as lenient:
            crashed = lenient.get("/boom")
        assert crashed.status_code == 500
        assert error_of(crashed) == {"type": "internal_error", "message": "internal server error"}
        assert "secret" not in crashed.text
        down = api.get("/db-down")
        assert down.status_code == 503 and error_of(down)["type"] == "database_unavailable"
        driver_error = api.get("/driver")
        assert driver_error.status_code == 503 and "hunter2" not in driver_error.text


def test_readiness_reports_an_unreachable_database(pg_url: str) -> None:
    with running_api(pg_url) as api:
        api.state._engine = _engine_to_nowhere()
        response = api.get("/readyz")
        assert response.status_code == 503
        error = error_of(response)
        assert error["type"] == "not_ready" and "cannot reach the database" in error["message"]


def _engine_to_nowhere():  # type: ignore[no-untyped-def]
    from domain.db.engine import create_db_engine

    # A closed port: the connect fails at once.
    return create_db_engine("postgresql+psycopg://nobody:pw@127.0.0.1:1/none", null_pool=True)


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ('{"name": "r", "timeout_s": Infinity}', "timeout_s", "expected a finite number"),
        ('{"name": "r", "timeout_s": NaN}', "timeout_s", "expected a finite number"),
        ('{"name": "r", "params": {"n": 123456789012345678901234567890}}', "params", "64 bits"),
        ('{"name": "r", "params": {"s": "a\\u0000b"}}', "params", "NUL"),
        ('{"name": "r", "idempotency_key": "a\\u0000b"}', "idempotency_key", "NUL"),
        ('{"name": "r", "delay_s": 1e10}', "delay_s", "less than or equal to 3153600000"),
        ('{"name": "r", "not_before": "0001-01-01T00:00:00+14:00"}', "not_before", "years 1"),
        ('{"name": "r", "priority": true}', "priority", "not true/false"),
        ('{"name": "r", "max_requests": 99999999999}', "max_requests", "2147483647"),
        ('{"name": "r", "budget_usd": 1e15}', "budget_usd", "less than"),
    ],
)
def test_values_no_column_can_store_are_422_naming_the_field_and_write_nothing(
    api: ApiClient, body: str, field: str, fragment: str
) -> None:
    with api.from_address("127.0.0.1", crashes=False) as lenient:
        response = lenient.as_role(
            "write",
            "POST",
            "/api/v1/runs",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422, response.text
        error = error_of(response)
        assert error["field"] == field and error["message"].startswith(f"{field}: ")
        assert fragment in error["message"]
        page = lenient.as_role("readonly", "GET", "/api/v1/runs")
    assert page.status_code == 200 and page.json()["items"] == []


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("{", "line 1 column 2"),
        ('{"name":\n "r",,}', "line 2 column 6"),
        ("[1,]", "line 1 column 4"),
    ],
)
def test_a_body_that_is_not_json_says_where(api: ApiClient, body: str, where: str) -> None:
    response = api.as_role(
        "write", "POST", "/api/v1/runs", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "body"
    assert error["message"].startswith(f"body: invalid JSON at {where}")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/pipelines/etl/trigger", {"priority": True}, "priority"),
        ("/api/v1/pipelines/etl/trigger", {"max_requests": 2**40}, "max_requests"),
        (
            "/api/v1/schedules",
            {
                "name": "s",
                "target": "t",
                "trigger": "interval",
                "expression": "1m",
                "priority": True,
            },
            "priority",
        ),
        (
            "/api/v1/schedules",
            {
                "name": "s",
                "target": "t",
                "trigger": "interval",
                "expression": "1m",
                "params": {"n": 2**70},
            },
            "params",
        ),
    ],
)
def test_pipelines_and_schedules_check_numbers_the_same_way(
    api: ApiClient, path: str, body: dict[str, object], field: str
) -> None:
    response = api.as_role("admin", "POST", path, json=body)
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == field
