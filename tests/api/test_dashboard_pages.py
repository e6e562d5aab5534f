"""The dashboard's schedules, pipelines, projects, limits and audit pages on PostgreSQL: each
shows what the matching /api/v1 route answers, and the audit log only to admins."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from fastapi import APIRouter
from sqlalchemy import insert, select

from api.dashboard.pages import PageRoute
from api.dashboard.session import Viewer
from domain.costs.ledger import add_usage, month_of
from domain.costs.projects import add_project
from domain.db.models import audit_logs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import DatabaseUnavailable
from domain.schedules.definitions import fires
from domain.security import audit
from tests.api.conftest import ApiClient, running_api
from tests.api.pages import table, urls_in
from tests.api.test_dashboard import browser
from tests.api.test_pipelines_api import discovered
from tests.runs_seed import insert_run

pytestmark = pytest.mark.postgres

PAGES = ["/schedules", "/pipelines", "/projects", "/limits"]


def test_every_page_is_in_the_navigation_and_audit_only_for_admins(pg_api: ApiClient) -> None:
    with browser(pg_api, "readonly") as reader, browser(pg_api, "admin") as admin:
        links = urls_in(reader.get("/").text)
        assert all(page in links for page in PAGES) and "/audit" not in links
        assert "/audit" in urls_in(admin.get("/").text)
        for page in PAGES:
            response = reader.get(page)
            assert response.status_code == 200, page
            assert response.headers["content-type"].startswith("text/html")
        refused = reader.get("/audit")
        assert refused.status_code == 403 and "needs admin" in refused.text


def test_schedules_show_next_fires_in_their_zone_and_the_fire_ledger(pg_api: ApiClient) -> None:
    made = pg_api.as_role(
        "admin",
        "POST",
        "/api/v1/schedules",
        json={
            "name": "nightly",
            "target": "report",
            "trigger": "cron",
            "expression": "30 2 * * *",
            "timezone": "Asia/Tokyo",
            "allow_unknown": True,
        },
    )
    assert made.status_code == 201, made.text
    fired = insert_run(pg_api.state.engine, status="succeeded", triggered_by="schedule")
    slot = datetime(2026, 1, 2, 17, 30, tzinfo=UTC)
    with pg_api.state.engine.begin() as conn:
        conn.execute(
            insert(fires),
            [
                {
                    "schedule_id": made.json()["id"],
                    "fire_at": slot,
                    "outcome": "enqueued",
                    "run_id": fired,
                },
                {
                    "schedule_id": made.json()["id"],
                    "fire_at": slot + timedelta(days=1),
                    "outcome": "skipped_overlap",
                    "run_id": None,
                },
            ],
        )
    with browser(pg_api, "readonly") as reader:
        listing = reader.get("/schedules").text
        detail = reader.get("/schedules/nightly").text
        missing = reader.get("/schedules/nope")

    [(_, cells)] = table(listing, "schedules")
    assert cells[2] == "cron 30 2 * * *" and cells[3] == "Asia/Tokyo"
    assert cells[5].count("02:30:00 JST") == 3  # 02:30 in Tokyo, three times
    ledger = [(attrs["data-outcome"], cells[0]) for attrs, cells in table(detail, "fires")]
    assert ledger == [
        ("skipped_overlap", "2026-01-03 17:30:00"),
        ("enqueued", "2026-01-02 17:30:00"),
    ]
    assert f'href="/runs/{fired}"' in detail
    assert detail.count("02:30:00 JST") == 10
    assert missing.status_code == 404 and "<html" in missing.text


def test_pipelines_show_environment_last_run_and_pipeline_json_problems(
    pg_api: ApiClient,
) -> None:
    engine = pg_api.state.engine
    discovered(
        engine,
        "ingest",
        total_runs=2,
        successful_runs=1,
        failed_runs=1,
        env_ready_at=datetime(2026, 3, 1, 8, 0, tzinfo=UTC),
    )
    discovered(engine, "broken", enabled=False, error="steps[0]: unknown key 'cmd'")
    last = insert_run(engine, "ingest", kind="pipeline", status="failed", error="exit 3")
    with browser(pg_api, "readonly") as reader:
        html = reader.get("/pipelines").text
    rows = {attrs["data-pipeline"]: cells for attrs, cells in table(html, "pipelines")}
    assert rows["ingest"][2] == "ready since 2026-03-01 08:00:00"
    assert rows["ingest"][3:6] == ["2", "1", "1"] and rows["ingest"][6] == "failed"
    assert f'href="/runs/{last}"' in html
    assert rows["broken"][1] == "disabled" and rows["broken"][2] == "not built"
    assert "pipeline.json: steps[0]: unknown key 'cmd'" in rows["broken"][7]


def test_projects_show_this_months_spend_against_the_limit(pg_api: ApiClient) -> None:
    engine = pg_api.state.engine
    now = datetime.now(UTC)
    add_project(UnitOfWork(engine), "research", monthly_cost_usd="10", now=now)
    with engine.begin() as conn:
        add_usage(conn, "research", month_of(now), usd=Decimal("2.5"), tokens=900)
    with browser(pg_api, "readonly") as reader:
        html = reader.get("/projects").text
    rows = {attrs["data-project"]: cells for attrs, cells in table(html, "projects")}
    assert rows["research"][1] == f"{now:%Y-%m}"
    assert rows["research"][2:4] == ["2.5", "10"] and rows["research"][4].endswith("25%")
    assert rows["research"][5] == "900"
    assert rows["default"][4] == "no limit"


def test_limits_show_rate_limits_and_the_concurrency_keys_in_use(pg_api: ApiClient) -> None:
    defined = pg_api.as_role(
        "admin", "PUT", "/api/v1/limits/openai", json={"requests_per_minute": 500}
    )
    assert defined.status_code == 200, defined.text
    later = datetime.now(UTC) + timedelta(minutes=5)
    for _ in range(2):
        insert_run(
            pg_api.state.engine,
            status="running",
            concurrency_key="repo:a",
            concurrency_max=2,
            lease_expires_at=later,
            attempt=1,
        )
    with browser(pg_api, "readonly") as reader:
        html = reader.get("/limits").text
    api_view = pg_api.as_role("readonly", "GET", "/api/v1/limits").json()
    [(attrs, cells)] = table(html, "rate-limits")
    assert attrs["data-limit"] == "openai" and cells[1] == "500"
    assert cells[3] == str(api_view["rate_limits"][0]["requests_left"])
    assert [cells for _, cells in table(html, "concurrency")] == [["repo:a", "2", "2", "0"]]


def test_the_audit_log_pages_by_keyset_and_filters(pg_api: ApiClient) -> None:
    now = datetime.now(UTC)
    with pg_api.state.engine.begin() as conn:
        for i in range(60):
            audit.add(
                conn,
                actor="alice" if i % 2 else "bob",
                action="run.cancel",
                target_type="run",
                target_id=f"r{i}",
                details={"i": i, "token": "cvy_x"},
                ip="10.0.0.1",
                ts=now,
            )
    with browser(pg_api, "admin") as admin:
        first = admin.get("/audit", params={"actor": "alice"}).text
        shown = [cells[3] for _, cells in table(first, "audit")]
        assert shown == [f"run r{i}" for i in range(59, 0, -2)]  # all 30 of alice's, newest first
        assert 'rel="next"' not in first
        everyone = admin.get("/audit").text
        [older] = [u for u in urls_in(everyone) if "cursor=" in u]
        rest = admin.get(older.replace("&amp;", "&")).text
    with pg_api.state.engine.connect() as conn:
        stored = conn.execute(select(audit_logs.c.id).order_by(audit_logs.c.id.desc())).scalars()
        newest_first = [str(i) for i in stored]
    first_ids, rest_ids = (
        [a["data-entry"] for a, _ in table(h, "audit")] for h in (everyone, rest)
    )
    assert len(first_ids) == 50 and first_ids + rest_ids == newest_first  # each once, in order
    assert "cvy_x" not in everyone + rest  # details are masked as recorded


def test_a_crash_a_database_outage_and_a_missing_page_are_pages_not_json(pg_url: str) -> None:
    boom = APIRouter(route_class=PageRoute)

    @boom.get("/boom-page")
    def crash(who: Viewer) -> None:
        raise RuntimeError(f"secret detail from {pg_url}")

    @boom.get("/down-page")
    def down(who: Viewer) -> None:
        raise DatabaseUnavailable("cannot reach the database postgresql://***@db/x: refused")

    with running_api(pg_url) as api:
        api.app.include_router(boom)
        with browser(api, "readonly") as reader:
            crashed = reader.get("/boom-page")
            outage = reader.get("/down-page")
            html = {"Accept": "text/html,application/xhtml+xml"}
            missing = reader.get("/no-such-page", headers=html)
            run = reader.get(f"/runs/{uuid.uuid4()}")
            client = reader.get("/api/v1/no-such-endpoint", headers=html)
    assert crashed.status_code == 500 and crashed.headers["content-type"].startswith("text/html")
    assert "internal server error" in crashed.text and "secret" not in crashed.text
    assert outage.status_code == 503 and "<html" in outage.text
    assert missing.status_code == 404 and "<html" in missing.text
    assert "no such endpoint: GET /no-such-page" in missing.text
    assert run.status_code == 404 and "no run with id" in run.text and "<html" in run.text
    assert client.status_code == 404 and client.json()["error"]["type"] == "not_found"
