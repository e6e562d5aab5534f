"""Prometheus /metrics: run counts and durations from the database, backlog and dispatch lag,
queue depth from Redis, HTTP and webhook counters of this process."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from api.options import ApiOptions
from domain.db.engine import create_db_engine
from tests.api.conftest import ApiClient, create_run, running_api, set_status
from tests.fakes import FakePublisher

NO_CACHE = ApiOptions(metrics_cache_s=0)


def samples(api: ApiClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_runs_by_name_and_status_durations_backlog_and_lag(db_url: str) -> None:
    with running_api(db_url, options=NO_CACHE) as api:
        engine = api.state.engine
        now = datetime.now(UTC)
        fast = create_run(api, "report")["id"]
        slow = create_run(api, "report")["id"]
        failed = create_run(api, "other")["id"]
        create_run(api, "report")  # still pending
        waiting = create_run(api, "late")["id"]
        set_status(
            engine, fast, "succeeded", started_at=now, finished_at=now + timedelta(seconds=0.3)
        )
        set_status(
            engine, slow, "succeeded", started_at=now, finished_at=now + timedelta(seconds=30)
        )
        set_status(engine, failed, "failed", started_at=now, finished_at=now + timedelta(seconds=2))
        set_status(engine, waiting, "pending", not_before=now - timedelta(seconds=120))

        found = samples(api)
        assert found[("conveyor_database_up", ())] == 1
        assert found[("conveyor_runs_recent", (("name", "report"), ("status", "succeeded")))] == 2
        assert found[("conveyor_runs_recent", (("name", "report"), ("status", "pending")))] == 1
        assert found[("conveyor_runs_recent", (("name", "other"), ("status", "failed")))] == 1
        bucket = "conveyor_run_duration_seconds_bucket"
        assert found[(bucket, (("le", "0.5"), ("name", "report")))] == 1
        assert found[(bucket, (("le", "60"), ("name", "report")))] == 2
        assert found[(bucket, (("le", "+Inf"), ("name", "report")))] == 2
        assert found[
            ("conveyor_run_duration_seconds_gsum", (("name", "report"),))
        ] == pytest.approx(30.3, abs=0.01)
        assert found[("conveyor_runs_active", (("status", "pending"),))] == 2
        assert found[("conveyor_dispatch_lag_seconds", ())] >= 120


def test_http_requests_are_counted_by_route_template(api: ApiClient) -> None:
    run_id = create_run(api)["id"]
    api.as_role("readonly", "GET", f"/api/v1/runs/{run_id}")
    api.as_role("readonly", "GET", "/api/v1/runs/not-a-uuid")
    api.get("/no/such/path")
    found = samples(api)
    detail = (("method", "GET"), ("route", "/api/v1/runs/{run_id}"))
    assert found[("conveyor_http_requests_total", (*detail, ("status", "200")))] == 1
    assert found[("conveyor_http_requests_total", (*detail, ("status", "422")))] == 1
    unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert found[("conveyor_http_requests_total", unmatched)] == 1
    assert not any(run_id in str(labels) for _, labels in found)


def test_metrics_survive_a_database_outage(pg_url: str) -> None:
    with running_api(pg_url, options=NO_CACHE) as api:
        api.state._engine = create_db_engine(
            "postgresql+psycopg://nobody@127.0.0.1:1/none", null_pool=True
        )
        found = samples(api)
        assert found[("conveyor_database_up", ())] == 0
        assert ("conveyor_http_requests_total", ()) not in found


@pytest.mark.redis
def test_queue_depth_counts_every_priority_list(db_url: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = ["default", "default:3", "default:9", "mail", "mail:5"]
    client.delete(*keys)
    try:
        client.rpush("default", "a", "b")
        client.rpush("default:3", "c")
        client.rpush("default:9", "d")
        client.rpush("mail:5", "e")
        with running_api(
            db_url, broker_url=redis_url, publisher=FakePublisher(), options=NO_CACHE
        ) as api:
            create_run(api, queue="mail")  # a pending run names the queue worth asking about
            found = samples(api)
            assert found[("conveyor_broker_up", ())] == 1
            assert found[("conveyor_queue_depth", (("queue", "default"),))] == 4
            assert found[("conveyor_queue_depth", (("queue", "mail"),))] == 1
            listed = api.as_role("readonly", "GET", "/api/v1/queues").json()["items"]
            assert {"queue": "mail", "depth": 1} in listed
            assert api.get("/readyz").status_code == 200
    finally:
        client.delete(*keys)
        client.close()


def test_readiness_fails_when_the_broker_is_down(db_url: str) -> None:
    dead = "redis://127.0.0.1:1/0"
    with running_api(db_url, broker_url=dead, publisher=FakePublisher()) as api:
        response = api.get("/readyz")
        assert response.status_code == 503
        assert "cannot reach the broker" in response.json()["error"]["message"]
        found = samples(api)
        assert found[("conveyor_broker_up", ())] == 0


def test_runs_waiting_per_limit(db_url: str) -> None:
    from domain.flow import manage, rates

    with running_api(db_url, options=NO_CACHE) as api:
        engine = api.state.engine
        with engine.begin() as conn:
            rates.save(conn, rates.RateLimit("openai", 5), defined_in="api", now=datetime.now(UTC))
            rates.save(conn, rates.RateLimit("quiet", 5), defined_in="api", now=datetime.now(UTC))
        for _ in range(2):
            rid = create_run(api)["id"]
            set_status(engine, rid, "waiting", wait_reason="rate:openai")
        keys = [f"repo:{i:02d}" for i in range(manage.MAX_KEYS_MEASURED + 3)]
        for key in keys:
            rid = create_run(api, concurrency_key=key)["id"]
            set_status(engine, rid, "waiting", wait_reason=f"concurrency:{key}")
        found = samples(api)
        assert found[("conveyor_limit_waiting", (("kind", "rate"), ("name", "openai")))] == 2
        assert found[("conveyor_limit_waiting", (("kind", "rate"), ("name", "quiet")))] == 0
        per_key = {
            labels: value
            for (name, labels), value in found.items()
            if name == "conveyor_limit_waiting" and ("kind", "concurrency") in labels
        }
        # The busiest keys each get a series; the rest are summed into one.
        assert len(per_key) == manage.MAX_KEYS_MEASURED + 1
        other = (("kind", "concurrency"), ("name", manage.OTHER_KEYS))
        assert per_key[other] == 3 and sum(per_key.values()) == len(keys)
