"""/api/v1/pipelines over HTTP: the discovered pipelines (read from the `pipelines` table, as
discovery leaves it), a detail with counters, last run and last error, and triggering a run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert

from domain.pipelines.reads import pipelines
from tests.api.conftest import ApiClient, error_of, set_status

BASE = "/api/v1/pipelines"


def discovered(engine: Engine, name: str, **values: Any) -> None:
    """A row as discovery writes it."""
    row = {
        "name": name,
        "path": f"/srv/pipelines/{name}",
        "description": f"{name} pipeline",
        "tags": ["etl"],
        "config": {"timeout": 60},
        "enabled": True,
        "synced_at": datetime.now(UTC),
        **values,
    }
    with engine.begin() as conn:
        conn.execute(insert(pipelines), [row])


def test_list_and_detail_with_counters_last_run_and_last_error(api: ApiClient) -> None:
    engine = api.state.engine
    discovered(engine, "ingest", total_runs=5, successful_runs=3, failed_runs=2, webhook_runs=1)
    discovered(engine, "broken", enabled=False, error="pipeline.json: timeout: not a number")

    items = api.as_role("readonly", "GET", BASE).json()["items"]
    assert [(p["name"], p["enabled"]) for p in items] == [("broken", False), ("ingest", True)]
    assert items[1]["counters"] == {"total": 5, "successful": 3, "failed": 2, "webhook": 1}
    assert "path" not in items[1]  # the listing stays small; the detail has it

    fresh = api.as_role("readonly", "GET", f"{BASE}/ingest").json()
    assert fresh["last_run"] is None and fresh["last_error"] is None
    assert fresh["config"] == {"timeout": 60} and fresh["path"] == "/srv/pipelines/ingest"

    failed = api.as_role("write", "POST", f"{BASE}/ingest/trigger").json()
    set_status(engine, failed["id"], "failed", error_type="PipelineFailed", error="exit code 3")
    newest = api.as_role("write", "POST", f"{BASE}/ingest/trigger").json()
    detail = api.as_role("readonly", "GET", f"{BASE}/ingest").json()
    assert detail["last_run"]["id"] == newest["id"]
    assert detail["last_failure"]["id"] == failed["id"]
    assert detail["last_error"] == "PipelineFailed: exit code 3"

    broken = api.as_role("readonly", "GET", f"{BASE}/broken").json()
    assert broken["last_error"] == "pipeline.json: timeout: not a number"
    missing = api.as_role("readonly", "GET", f"{BASE}/nope")
    assert missing.status_code == 404 and "no pipeline named 'nope'" in error_of(missing)["message"]


def test_trigger_creates_a_pipeline_run_once_per_key(api: ApiClient) -> None:
    discovered(api.state.engine, "ingest")
    body = {"params": {"day": "2026-01-01"}, "idempotency_key": "ingest-0101", "priority": 8}
    created = api.as_role("write", "POST", f"{BASE}/ingest/trigger", json=body)
    assert created.status_code == 201, created.text
    run = created.json()
    assert (run["kind"], run["name"], run["priority"]) == ("pipeline", "ingest", 8)
    assert (run["triggered_by"], run["trigger_ref"]) == ("api", "write-token")
    assert created.headers["location"] == f"/api/v1/runs/{run['id']}"
    again = api.as_role("write", "POST", f"{BASE}/ingest/trigger", json=body)
    assert again.status_code == 200 and again.json()["id"] == run["id"]

    audit = api.as_role("admin", "GET", "/api/v1/audit?action=pipeline.trigger").json()["items"]
    assert [(e["target_id"], e["details"]["pipeline"]) for e in audit] == [(run["id"], "ingest")]


def test_trigger_refuses_unknown_broken_and_unauthorised(api: ApiClient) -> None:
    discovered(api.state.engine, "broken", enabled=False, error="no entrypoint")
    unknown = api.as_role("write", "POST", f"{BASE}/nope/trigger")
    assert unknown.status_code == 404
    broken = api.as_role("write", "POST", f"{BASE}/broken/trigger")
    assert broken.status_code == 409
    assert error_of(broken)["message"] == "pipeline 'broken' cannot run: no entrypoint"
    assert api.as_role("readonly", "POST", f"{BASE}/broken/trigger").status_code == 403
    extra = api.as_role("write", "POST", f"{BASE}/broken/trigger", json={"nmae": "x"})
    assert extra.status_code == 422 and error_of(extra)["field"] == "nmae"
    discovered(api.state.engine, "ingest")
    no_project = api.as_role("write", "POST", f"{BASE}/ingest/trigger", json={"project": "nope"})
    assert no_project.status_code == 422, no_project.text
    assert api.as_role("readonly", "GET", "/api/v1/runs").json()["items"] == []
