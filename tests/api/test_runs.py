"""/api/v1/runs over HTTP: list with filters and cursor, detail, logs, records, create, cancel,
retry; health and readiness."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from domain.tasks.registry import Registry, RegistryCatalog
from tests.api.conftest import (
    ApiClient,
    add_logs,
    add_records,
    create_run,
    error_of,
    running_api,
    set_status,
)


def test_list_filters_and_keyset_pages(api: ApiClient) -> None:
    ids = [create_run(api, "report", params={"i": i})["id"] for i in range(7)]
    other = create_run(api, "other")["id"]
    set_status(api.state.engine, ids[0], "failed")

    seen: list[str] = []
    cursor = None
    while True:
        params = {"name": "report", "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = api.as_role("readonly", "GET", "/api/v1/runs", params=params).json()
        seen += [run["id"] for run in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each once
    failed = api.as_role("readonly", "GET", "/api/v1/runs?status=failed&status=running").json()
    assert [r["id"] for r in failed["items"]] == [ids[0]]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert api.as_role(
        "readonly", "GET", "/api/v1/runs", params={"created_after": later}
    ).json() == {"items": [], "next_cursor": None}
    everything = api.as_role("readonly", "GET", "/api/v1/runs?limit=1000").json()["items"]
    assert other in {r["id"] for r in everything} and len(everything) == 8


def test_detail_has_steps_totals_and_costs_per_model(api: ApiClient) -> None:
    run = create_run(api)
    add_records(api.state.engine, run["id"])
    add_logs(api.state.engine, run["id"], range(1, 4))
    detail = api.as_role("readonly", "GET", f"/api/v1/runs/{run['id']}").json()
    assert detail["id"] == run["id"] and detail["status"] == "pending"
    assert [s["name"] for s in detail["steps"]] == ["fetch", "llm"]
    assert detail["totals"]["log_lines"] == 3
    assert detail["totals"]["steps"] == {"completed": 1, "running": 1}
    [cost] = detail["costs"]
    assert Decimal(cost.pop("cost_usd")) == Decimal("0.0004")  # exact, never a float
    assert cost == {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "tokens_in": 1800,
        "tokens_out": 160,
        "requests": 2,
    }


def test_logs_metrics_costs_artifacts(api: ApiClient) -> None:
    run_id = create_run(api)["id"]
    add_logs(api.state.engine, run_id, range(1, 6))
    add_records(api.state.engine, run_id)
    base = f"/api/v1/runs/{run_id}"
    logs = api.as_role("readonly", "GET", f"{base}/logs?after_seq=2&limit=2").json()
    assert [line["seq"] for line in logs["items"]] == [3, 4]
    assert logs["next_after_seq"] == 4
    assert logs["items"][0]["message"] == "line 3" and logs["items"][0]["fields"] == {"n": 3}
    rest = api.as_role("readonly", "GET", f"{base}/logs?after_seq=4").json()
    assert [line["seq"] for line in rest["items"]] == [5]
    metrics = api.as_role("readonly", "GET", f"{base}/metrics?name=rows").json()["items"]
    assert [(m["name"], m["value"], m["labels"]) for m in metrics] == [("rows", 120.0, {"t": "a"})]
    costs = api.as_role("readonly", "GET", f"{base}/costs").json()
    assert [Decimal(c["cost_usd"]) for c in costs["items"]] == [
        Decimal("0.00019"),
        Decimal("0.00021"),
    ]
    assert Decimal(costs["total"].pop("cost_usd")) == Decimal("0.0004")
    assert costs["total"] == {
        "tokens_in": 1800,
        "tokens_out": 160,
        "requests": 2,
    }
    artifacts = api.as_role("readonly", "GET", f"{base}/artifacts").json()["items"]
    assert [(a["name"], a["size_bytes"]) for a in artifacts] == [("report.csv", 10)]


def test_create_is_idempotent_by_key_or_header(api: ApiClient) -> None:
    body = {"name": "report", "params": {"customer_id": 7}, "idempotency_key": "r-7"}
    first = api.as_role("write", "POST", "/api/v1/runs", json=body)
    again = api.as_role("write", "POST", "/api/v1/runs", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert first.json()["triggered_by"] == "api" and first.json()["trigger_ref"] == "write-token"
    assert first.headers["location"] == f"/api/v1/runs/{first.json()['id']}"
    by_header = api.as_role(
        "write",
        "POST",
        "/api/v1/runs",
        json={"name": "report", "params": {"customer_id": 7}},
        headers={"Idempotency-Key": "r-7"},
    )
    assert by_header.status_code == 200 and by_header.json()["id"] == first.json()["id"]
    reused = api.as_role(
        "write", "POST", "/api/v1/runs", json={**body, "params": {"customer_id": 8}}
    )
    assert reused.status_code == 409 and error_of(reused)["type"] == "conflict"


def test_create_refuses_bad_input_and_writes_nothing(api: ApiClient) -> None:
    cases = [
        ({"name": "bad name!"}, "name"),
        ({"name": "t", "priority": 12}, "priority"),
        ({"name": "t", "params": [1, 2]}, "params"),
        ({"name": "t", "surprise": 1}, "surprise"),
        ({"name": "t", "project": "nope"}, "project"),
        ({"name": "t", "not_before": "2026-01-01T00:00:00"}, "not_before"),
    ]
    for body, field in cases:
        response = api.as_role("write", "POST", "/api/v1/runs", json=body)
        assert response.status_code == 422, (body, response.text)
        assert error_of(response)["field"] == field, body
    not_json = api.as_role(
        "write",
        "POST",
        "/api/v1/runs",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert not_json.status_code == 422 and error_of(not_json)["type"] == "invalid_input"
    assert api.as_role("readonly", "GET", "/api/v1/runs").json()["items"] == []


def test_create_checks_params_against_the_task(db_url: str) -> None:
    registry = Registry()

    @registry.task(name="send_report")
    def send_report(ctx: object, customer_id: int) -> None: ...

    with running_api(db_url, catalog=RegistryCatalog(registry)) as api:
        ok = api.as_role(
            "write",
            "POST",
            "/api/v1/runs",
            json={"name": "send_report", "params": {"customer_id": 1}},
        )
        assert ok.status_code == 201
        bad = api.as_role(
            "write", "POST", "/api/v1/runs", json={"name": "send_report", "params": {"x": 1}}
        )
        assert bad.status_code == 422 and error_of(bad)["field"] == "customer_id"
        unknown = api.as_role("write", "POST", "/api/v1/runs", json={"name": "nope"})
        assert unknown.status_code == 422
        assert error_of(unknown)["type"] == "unknown_task"


def test_cancel_and_retry(api: ApiClient) -> None:
    run_id = create_run(api)["id"]
    cancelled = api.as_role(
        "write", "POST", f"/api/v1/runs/{run_id}/cancel", json={"reason": "not needed"}
    )
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    twice = api.as_role("write", "POST", f"/api/v1/runs/{run_id}/cancel")
    assert twice.status_code == 409 and error_of(twice)["type"] == "invalid_transition"
    retried = api.as_role("write", "POST", f"/api/v1/runs/{run_id}/retry")
    assert retried.status_code == 201
    assert retried.json()["parent_run_id"] == run_id and retried.json()["status"] == "pending"
    not_finished = api.as_role("write", "POST", f"/api/v1/runs/{retried.json()['id']}/retry")
    assert not_finished.status_code == 409

    running = create_run(api)["id"]
    set_status(api.state.engine, running, "running")
    asked = api.as_role("write", "POST", f"/api/v1/runs/{running}/cancel").json()
    assert asked["status"] == "running" and asked["cancel_requested_at"] is not None


def test_unknown_run_is_404_everywhere(api: ApiClient) -> None:
    missing = "01900000-0000-7000-8000-000000000000"
    for method, path in [
        ("GET", ""),
        ("GET", "/logs"),
        ("GET", "/logs/stream"),
        ("GET", "/metrics"),
        ("GET", "/costs"),
        ("GET", "/artifacts"),
        ("POST", "/cancel"),
        ("POST", "/retry"),
    ]:
        response = api.as_role("admin", method, f"/api/v1/runs/{missing}{path}")
        assert response.status_code == 404, (method, path, response.text)
        assert error_of(response)["type"] == "run_not_found"


def test_workers_come_from_the_workers_table(api: ApiClient) -> None:
    from sqlalchemy import insert

    from domain.db.models import Worker

    now = datetime.now(UTC)
    with api.state.engine.begin() as conn:
        conn.execute(
            insert(Worker.__table__),
            [
                {
                    "id": "w1@host",
                    "hostname": "host",
                    "pid": 10,
                    "queues": {"names": ["default"]},
                    "started_at": now,
                    "heartbeat_at": now,
                    "running": 2,
                    "stopped": False,
                },
                {
                    "id": "w0@host",
                    "hostname": "host",
                    "pid": 9,
                    "queues": {},
                    "started_at": now,
                    "heartbeat_at": now,
                    "running": 0,
                    "stopped": True,
                },
            ],
        )
    items = api.as_role("readonly", "GET", "/api/v1/workers").json()["items"]
    assert [(w["id"], w["running"]) for w in items] == [("w1@host", 2)]


def test_a_worker_whose_heartbeat_stopped_is_lost_and_runs_nothing(api: ApiClient) -> None:
    from sqlalchemy import insert

    from domain.db.models import Worker

    now = datetime.now(UTC)
    row = {"hostname": "host", "queues": {}, "started_at": now, "stopped": False, "running": 1}
    with api.state.engine.begin() as conn:
        conn.execute(
            insert(Worker.__table__),
            [
                {**row, "id": "alive@host", "pid": 1, "heartbeat_at": now},
                {**row, "id": "lost@host", "pid": 2, "heartbeat_at": now - timedelta(minutes=1)},
            ],
        )
    items = api.as_role("readonly", "GET", "/api/v1/workers").json()["items"]
    assert [(w["id"], w["state"], w["running"]) for w in items] == [
        ("alive@host", "alive", 1),
        ("lost@host", "lost", None),
    ]


def test_health_and_readiness(api: ApiClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert api.get("/openapi.json").json()["info"]["title"] == "conveyor"
    assert api.get("/docs").status_code == 200


def test_create_resolves_through_the_catalog_and_warns_when_nothing_will_run_it(
    db_url: str,
) -> None:
    """The API imports no task code: a task a worker published is checked and completed from
    the catalog; an unpublished one is refused unless allow_unknown; warnings say why a run
    may wait."""
    from domain.clock import utc_now
    from domain.tasks import catalog
    from domain.tasks.catalog import CompositeCatalog, TaskTableCatalog

    registry = Registry()

    @registry.task(name="send_report", max_attempts=4, queue="reports")
    def send_report(ctx: object, customer_id: int) -> None: ...

    with running_api(db_url, catalog=None) as api:
        engine = api.state.engine
        catalog.publish(engine, registry.specs(), owner="w:1", now=utc_now())
        api.state.catalog = CompositeCatalog(TaskTableCatalog(engine))
        made = api.as_role(
            "write", "POST", "/api/v1/runs",
            json={"name": "send_report", "params": {"customer_id": 1}},
        )  # fmt: skip
        assert made.status_code == 201, made.text
        body = made.json()
        assert (body["max_attempts"], body["queue"]) == (4, "reports")
        assert body["warnings"] == [
            "no live worker consumes queue 'reports': the run waits until one does "
            "(conveyor worker -Q reports)"
        ]
        typo = api.as_role("write", "POST", "/api/v1/runs", json={"name": "send_reprot"})
        assert typo.status_code == 422
        assert "did you mean 'send_report'?" in error_of(typo)["message"]
        later = api.as_role(
            "write", "POST", "/api/v1/runs", json={"name": "deploy_later", "allow_unknown": True}
        )
        assert later.status_code == 201
        assert later.json()["warnings"][0].startswith("no worker has published task")
