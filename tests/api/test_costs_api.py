"""/api/v1/costs: the ledger grouped and summed exactly, as `conveyor costs` reports it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tests.api.conftest import ApiClient, add_records, create_run, error_of

BASE = "/api/v1/costs"


def test_groups_sum_exactly_to_the_total(api: ApiClient) -> None:
    for name in ("report", "report", "summary"):
        add_records(api.state.engine, create_run(api, name)["id"])  # 0.00019 + 0.00021 each
    body = api.as_role("readonly", "GET", BASE, params={"by": "name"}).json()
    # Decimal strings (SQLite keeps the digits given, PostgreSQL NUMERIC(20, 10) pads them).
    assert body["by"] == "name" and Decimal(body["total_usd"]) == Decimal("0.0012")
    assert [(i["name"], Decimal(i["cost_usd"]), i["entries"]) for i in body["items"]] == [
        ("report", Decimal("0.0008"), 4),
        ("summary", Decimal("0.0004"), 2),
    ]
    assert [i["tokens_in"] for i in body["items"]] == [3600, 1800]
    by_model = api.as_role("readonly", "GET", BASE).json()
    assert [(i["model"], Decimal(i["cost_usd"])) for i in by_model["items"]] == [
        ("gpt-4o-mini", Decimal("0.0012"))
    ]


def test_filters_by_project_and_time(api: ApiClient) -> None:
    add_records(api.state.engine, create_run(api)["id"])
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    none_yet = api.as_role("readonly", "GET", BASE, params={"since": later}).json()
    assert none_yet["items"] == [] and none_yet["total_usd"] == "0"
    other = api.as_role("readonly", "GET", BASE, params={"project": "elsewhere"}).json()
    assert other["items"] == []


def test_bad_group_and_naive_time_are_refused(api: ApiClient) -> None:
    bad = api.as_role("readonly", "GET", BASE, params={"by": "colour"})
    assert bad.status_code in (400, 422)
    assert error_of(bad)["field"] == "by"
    naive = api.as_role("readonly", "GET", BASE, params={"since": "2026-01-01T00:00:00"})
    assert naive.status_code in (400, 422) and error_of(naive)["field"] == "since"
    assert api.request("GET", BASE).status_code == 401  # no token
