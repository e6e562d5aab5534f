"""/api/v1/stats: per project, name and day or hour; from run_stats rollups as far as the
scheduler wrote them, computed from runs past that. Both databases give the same numbers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import insert

from domain.db import cursors
from domain.housekeeping.stats import ROLLUPS, run_stats
from tests.api.conftest import ApiClient, create_run, error_of, set_status

BASE = "/api/v1/stats"


def test_computed_from_runs_before_any_rollup(api: ApiClient) -> None:
    engine = api.state.engine
    now = datetime.now(UTC)
    for seconds, status in ((1, "succeeded"), (2, "succeeded"), (3, "failed"), (9, "timed_out")):
        run = create_run(api, "report")
        set_status(
            engine,
            run["id"],
            status,
            started_at=now - timedelta(seconds=seconds),
            finished_at=now,
            cost_usd=Decimal("0.25"),
            tokens_in=100,
            tokens_out=10,
        )
    create_run(api, "report")  # still pending: not counted until it ends
    set_status(engine, create_run(api, "other")["id"], "cancelled", finished_at=now)

    body = api.as_role("readonly", "GET", BASE, params={"name": "report"}).json()
    assert body["source"] == "runs" and body["period"] == "day" and not body["truncated"]
    [bucket] = body["items"]
    assert (
        bucket["period_start"] == now.replace(hour=0, minute=0, second=0, microsecond=0).isoformat()
    )
    assert (bucket["project"], bucket["name"], bucket["total"]) == ("default", "report", 4)
    assert bucket["counts"] == {
        "pending": 0,
        "running": 0,
        "waiting": 0,
        "succeeded": 2,
        "failed": 1,
        "cancelled": 0,
        "timed_out": 1,
        "budget_exceeded": 0,
    }
    assert bucket["duration_p50_s"] == 2.5  # percentile_cont of 1, 2, 3, 9
    assert bucket["duration_max_s"] == 9.0
    assert round(bucket["duration_p95_s"], 2) == 8.1
    assert (bucket["cost_usd"], bucket["tokens_in"], bucket["tokens_out"]) == ("1", 400, 40)

    hourly = api.as_role("readonly", "GET", BASE, params={"period": "hour"}).json()
    assert sorted(b["name"] for b in hourly["items"]) == ["other", "report"]
    assert hourly["items"][0]["period_start"].endswith(":00:00+00:00")
    limited = api.as_role("readonly", "GET", BASE, params={"limit": 1}).json()
    assert len(limited["items"]) == 1 and limited["truncated"] is True


def test_rollups_answer_as_far_as_their_cursor_and_runs_past_it(api: ApiClient) -> None:
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with api.state.engine.begin() as conn:
        conn.execute(
            insert(run_stats),
            [
                {
                    "period": "day",
                    "period_start": day - timedelta(days=1),
                    "project": "default",
                    "name": "report",
                    "counts": {"succeeded": 40, "failed": 2},
                    "duration_p50_s": 1.5,
                    "duration_p95_s": 4.0,
                    "duration_max_s": 7.0,
                    "cost_usd": Decimal("3.5"),
                    "tokens_in": 1000,
                    "tokens_out": 50,
                    "updated_at": day,
                }
            ],
        )
        cursors.move(conn, ROLLUPS, day, day)  # the pass that wrote it reached today's start
    engine = api.state.engine
    finished = create_run(api, "report")
    set_status(engine, finished["id"], "succeeded", started_at=day, finished_at=day)
    body = api.as_role("readonly", "GET", BASE).json()
    assert body["source"] == "mixed"  # yesterday rolled up, today from the runs
    [yesterday, today] = body["items"]
    assert (yesterday["total"], yesterday["counts"]["failed"], yesterday["cost_usd"]) == (
        42,
        2,
        "3.5",
    )
    assert (today["period_start"], today["total"]) == (day.isoformat(), 1)
    with engine.begin() as conn:
        cursors.move(conn, ROLLUPS, datetime.now(UTC), datetime.now(UTC))
    body = api.as_role("readonly", "GET", BASE).json()
    assert body["source"] == "rollups"  # today too: the rollups have not written it
    assert [b["total"] for b in body["items"]] == [42]
    other = api.as_role("readonly", "GET", BASE, params={"project": "acme"}).json()
    assert other["items"] == [] and other["source"] == "rollups"


def test_bad_windows_are_422(api: ApiClient) -> None:
    now = datetime.now(UTC)
    cases = [
        ({"period": "week"}, "period"),
        ({"since": now.isoformat(), "until": (now - timedelta(1)).isoformat()}, "since"),
        ({"period": "hour", "since": (now - timedelta(days=40)).isoformat()}, "since"),
        ({"since": "2026-01-01T00:00:00"}, "since"),  # no time zone
        ({"limit": 0}, "limit"),
        ({"status": "failed"}, "status"),  # unknown filter
    ]
    for params, field in cases:
        response = api.as_role("readonly", "GET", BASE, params=params)
        assert response.status_code == 422, (params, response.text)
        assert error_of(response)["field"] == field, params
    assert api.get(BASE).status_code == 401
