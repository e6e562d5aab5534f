"""A callback_url no POST can reach is refused at create time, naming the field, with no run."""

from __future__ import annotations

import pytest

from tests.api.conftest import ApiClient, error_of


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://0177.0.0.1/x", "four decimal numbers without leading zeros"),
        ("http://127.000.000.001/x", "a resolver reads it as 127.0.0.1"),
        ("http://☃.net/x", "Invalid IDNA hostname"),
        ("http://example.com:70000/x", "port 70000"),
    ],
)
def test_an_undeliverable_callback_url_is_422_and_creates_nothing(
    api: ApiClient, url: str, says: str
) -> None:
    body = {"name": "report", "callback_url": url}
    response = api.as_role("write", "POST", "/api/v1/runs", json=body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["field"] == "callback_url" and says in error["message"], error
    assert api.as_role("readonly", "GET", "/api/v1/runs").json()["items"] == []
    ok = api.as_role(
        "write", "POST", "/api/v1/runs", json={**body, "callback_url": "https://bücher.de/x"}
    )
    assert ok.status_code == 201, ok.text
