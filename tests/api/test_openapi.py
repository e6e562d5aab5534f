"""/openapi.json declares the bearer scheme, each route's real response, and the one error
shape; the documented models match what the routes send."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from api.app import create_api
from api.openapi import RESPONSES
from domain.settings import load_settings
from tests.api.conftest import ApiClient, create_run

PUBLIC = {"GET /healthz", "GET /readyz", "GET /metrics"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    document: dict[str, Any] = create_api(
        load_settings(database_url="sqlite://", broker_url="memory://")
    ).openapi()
    return document


def operations(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{method.upper()} {path}", op)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    ]


def test_every_route_with_a_token_declares_the_bearer_scheme(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token (conveyor tokens create)",
    }
    for label, op in operations(doc):
        if label.split()[1].startswith("/api/"):
            assert op.get("security") == [{"bearer": []}], label
            assert {"401", "403"} <= set(op["responses"]), label
        else:  # probes, metrics and webhooks (which carry their own signature)
            assert "security" not in op, label


def test_every_json_response_has_a_real_model(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for label, op in operations(doc):
        for status, response in op["responses"].items():
            content = response.get("content", {}).get("application/json")
            if content is None:
                continue
            ref = content["schema"].get("$ref")
            assert ref is not None, (label, status, content)
            assert schemas[ref.rsplit("/", 1)[1]].get("properties"), (label, status)


def test_errors_have_the_one_shape(doc: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for label, op in operations(doc):
        for status in {"401", "403", "404", "409", "422"} & set(op["responses"]):
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (label, status)
        if "{" in label:
            assert "404" in op["responses"], label
    error = doc["components"]["schemas"]["ErrorBody"]
    assert error["properties"]["error"] == {"$ref": "#/components/schemas/ErrorDetail"}


def test_the_documented_models_are_what_the_routes_send(api: ApiClient) -> None:
    run = create_run(api, "report", params={"n": 1})
    bodies = {
        "POST /api/v1/runs": run,
        "GET /api/v1/runs": api.as_role("readonly", "GET", "/api/v1/runs").json(),
        "GET /api/v1/runs/{run_id}": api.as_role(
            "readonly", "GET", f"/api/v1/runs/{run['id']}"
        ).json(),
        "GET /api/v1/runs/{run_id}/logs": api.as_role(
            "readonly", "GET", f"/api/v1/runs/{run['id']}/logs"
        ).json(),
        "POST /api/v1/runs/{run_id}/cancel": api.as_role(
            "write", "POST", f"/api/v1/runs/{run['id']}/cancel"
        ).json(),
        "GET /api/v1/workers": api.as_role("readonly", "GET", "/api/v1/workers").json(),
        "GET /readyz": api.get("/readyz").json(),
        "GET /healthz": api.get("/healthz").json(),
        "POST /api/v1/schedules": api.as_role(
            "admin",
            "POST",
            "/api/v1/schedules",
            json={"name": "s", "target": "report", "trigger": "interval", "expression": "1h"},
        ).json(),
        "GET /api/v1/schedules/{name}": api.as_role(
            "readonly", "GET", "/api/v1/schedules/s"
        ).json(),
        "GET /api/v1/stats": api.as_role("readonly", "GET", "/api/v1/stats").json(),
        "GET /api/v1/costs": api.as_role("readonly", "GET", "/api/v1/costs").json(),
        "GET /api/v1/audit": api.as_role("admin", "GET", "/api/v1/audit").json(),
        "GET /api/v1/tokens": api.as_role("admin", "GET", "/api/v1/tokens").json(),
        "PUT /api/v1/limits/{name}": api.as_role(
            "admin", "PUT", "/api/v1/limits/llm", json={"tokens_per_minute": 9}
        ).json(),
        "GET /api/v1/limits": api.as_role("readonly", "GET", "/api/v1/limits").json(),
    }
    (limit,) = bodies["GET /api/v1/limits"]["rate_limits"]
    assert set(limit) == set(RESPONSES["PUT /api/v1/limits/{name}"].model_fields)
    for label, body in bodies.items():
        model = RESPONSES[label]
        assert set(body) == set(model.model_fields), label
        model.model_validate(body)
        for item in body.get("items", []) if isinstance(body.get("items"), list) else []:
            if isinstance(item, dict):
                inner = model.model_fields["items"].annotation.__args__[0]  # type: ignore[union-attr]
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    assert set(item) == set(inner.model_fields), label
