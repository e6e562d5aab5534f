"""/api/v1/schedules over HTTP: CRUD, pause/resume, preview, fire by hand; roles and audit;
bad expressions and time zones as 422, never 500."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

from tests.api.conftest import ApiClient, error_of

BASE = "/api/v1/schedules"
NIGHTLY = {
    "name": "nightly",
    "target": "report",
    "params": {"customer_id": 7},
    "trigger": "cron",
    "expression": "30 2 * * *",
    "timezone": "Europe/Berlin",
}


def create(api: ApiClient, **body: Any) -> dict[str, Any]:
    response = api.as_role("admin", "POST", BASE, json={**NIGHTLY, **body})
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def test_create_read_replace_pause_resume_delete(api: ApiClient) -> None:
    made = create(api)
    assert (made["name"], made["target_name"], made["source"]) == ("nightly", "report", "api")
    assert made["enabled"] is True and made["next_fire_at"] is not None
    assert datetime.fromisoformat(made["next_fire_at"]).astimezone().minute == 30

    listed = api.as_role("readonly", "GET", BASE).json()["items"]
    assert [s["name"] for s in listed] == ["nightly"]
    detail = api.as_role("readonly", "GET", f"{BASE}/nightly").json()
    assert detail["params"] == {"customer_id": 7} and detail["fires"] == []

    replaced = api.as_role(
        "admin",
        "PUT",
        f"{BASE}/nightly",
        json={"target": "report", "trigger": "interval", "expression": "15m"},
    )
    assert replaced.status_code == 200, replaced.text
    body = replaced.json()
    assert (body["trigger"], body["expression"], body["timezone"]) == ("interval", "15m", "UTC")
    assert body["params"] == {}  # a replace, not a merge

    paused = api.as_role("admin", "POST", f"{BASE}/nightly/pause").json()
    assert paused["enabled"] is False
    assert api.as_role("admin", "POST", f"{BASE}/nightly/resume").json()["enabled"] is True

    assert api.as_role("admin", "DELETE", f"{BASE}/nightly").status_code == 204
    gone = api.as_role("readonly", "GET", f"{BASE}/nightly")
    assert gone.status_code == 404 and error_of(gone)["message"] == "no schedule named 'nightly'"

    audit = api.as_role("admin", "GET", "/api/v1/audit?target_type=schedule").json()["items"]
    assert [(e["action"], e["actor"]) for e in reversed(audit)] == [
        ("schedule.add", "admin-token"),
        ("schedule.replace", "admin-token"),
        ("schedule.pause", "admin-token"),
        ("schedule.resume", "admin-token"),
        ("schedule.remove", "admin-token"),
    ]


def test_preview_of_a_schedule_and_of_an_expression(api: ApiClient) -> None:
    create(api, trigger="interval", expression="1h", timezone="UTC")
    times = api.as_role("readonly", "GET", f"{BASE}/nightly/preview?count=3").json()["items"]
    instants = [datetime.fromisoformat(t) for t in times]
    assert len(instants) == 3
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(instants)] == [
        3600,
        3600,
    ]
    weekdays = api.as_role(
        "readonly",
        "POST",
        f"{BASE}/preview",
        json={"trigger": "cron", "expression": "0 9 * * 1-5", "count": 10},
    ).json()["items"]
    assert len(weekdays) == 10
    assert all(datetime.fromisoformat(t).weekday() < 5 for t in weekdays)
    assert all(datetime.fromisoformat(t).hour == 9 for t in weekdays)
    too_many = api.as_role("readonly", "GET", f"{BASE}/nightly/preview?count=1001")
    assert too_many.status_code == 422 and error_of(too_many)["field"] == "count"


def test_fire_by_hand_creates_a_manual_run(api: ApiClient) -> None:
    schedule = create(api)
    fired = api.as_role("write", "POST", f"{BASE}/nightly/fire")
    assert fired.status_code == 201, fired.text
    run = fired.json()
    assert (run["name"], run["params"], run["status"]) == ("report", {"customer_id": 7}, "pending")
    assert (run["triggered_by"], run["trigger_ref"]) == ("manual", f"schedule:{schedule['id']}")
    # A run by hand is not a slot: the schedule's history is unchanged.
    assert api.as_role("readonly", "GET", f"{BASE}/nightly").json()["fires"] == []


def test_roles_readonly_reads_write_fires_admin_manages(api: ApiClient) -> None:
    create(api)
    for role in ("readonly", "write"):
        denied = api.as_role(role, "POST", BASE, json={**NIGHTLY, "name": "other"})
        assert denied.status_code == 403, role
        assert api.as_role(role, "POST", f"{BASE}/nightly/pause").status_code == 403
        assert api.as_role(role, "DELETE", f"{BASE}/nightly").status_code == 403
    assert api.as_role("readonly", "POST", f"{BASE}/nightly/fire").status_code == 403
    assert api.get(BASE).status_code == 401


def test_bad_definitions_are_422_and_change_nothing(api: ApiClient) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"expression": "61 * * * *"}, "cron", "is not valid"),
        ({"expression": "* * *"}, "cron", "has 3 fields"),
        ({"timezone": "Mars/Olympus"}, "timezone", "is not an IANA time zone"),
        ({"timezone": "America"}, "timezone", "is not an IANA time zone"),
        ({"trigger": "interval", "expression": "soon"}, "every", "is not a duration"),
        ({"trigger": "once", "expression": "2001-01-01T00:00:00Z"}, "at", "in the past"),
        ({"misfire_policy": "catch_up"}, "catch_up_limit", "needs a limit"),
        ({"name": "no spaces allowed"}, "name", "should match pattern"),
        ({"start_at": "2030-01-01T00:00:00"}, "start_at", "timezone"),
        ({"target_kind": "pipeline"}, "", "no pipeline named 'report'"),
        ({"project": "nope"}, "project", "no project named 'nope'"),
    ]
    for change, field, fragment in cases:
        response = api.as_role("admin", "POST", BASE, json={**NIGHTLY, **change})
        assert response.status_code == 422, (change, response.text)
        error = error_of(response)
        assert fragment in error["message"], (change, error)
        if field:
            assert error.get("field") == field, (change, error)
    assert api.as_role("readonly", "GET", BASE).json()["items"] == []

    create(api)
    duplicate = api.as_role("admin", "POST", BASE, json=NIGHTLY)
    assert duplicate.status_code == 409
    missing = api.as_role("admin", "PUT", f"{BASE}/nope", json={**NIGHTLY, "name": None})
    assert missing.status_code == 422  # name is not part of a replacement
    missing = api.as_role(
        "admin", "PUT", f"{BASE}/nope", json={k: v for k, v in NIGHTLY.items() if k != "name"}
    )
    assert missing.status_code == 404
    assert api.as_role("admin", "POST", f"{BASE}/nope/fire").status_code == 404
