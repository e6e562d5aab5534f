"""A run's page on PostgreSQL beyond its facts and logs: the attempts and steps timeline with
replayed and waiting marks, cpu and memory charts, cost per step, artifacts, and a signal sent
from its form as the API sends one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select

from api.dashboard.pages import NONE
from domain.db.models import RunArtifact, RunMetric, RunSignal, audit_logs, cost_entries, run_steps
from tests.api.conftest import ApiClient, add_logs, create_run, set_status
from tests.api.pages import csrf_of, table
from tests.api.test_dashboard import browser

pytestmark = pytest.mark.postgres


def seed_second_attempt(api: ApiClient) -> str:
    """A run on its second attempt: step 1 done in the first (replayed), now asleep in step 2."""
    run_id = create_run(api)["id"]
    start = datetime.now(UTC) - timedelta(minutes=2)
    set_status(api.state.engine, run_id, "waiting", attempt=2, started_at=start)
    rid = uuid.UUID(run_id)
    add_logs(api.state.engine, run_id, range(1, 3), attempt=1)
    add_logs(api.state.engine, run_id, range(3, 5), attempt=2)
    with api.state.engine.begin() as conn:
        conn.execute(
            insert(run_steps),
            [
                {
                    "run_id": rid,
                    "seq": 1,
                    "attempt": 1,
                    "name": "fetch",
                    "step_type": "step",
                    "occurrence": 1,
                    "status": "completed",
                    "started_at": start,
                    "finished_at": start + timedelta(seconds=20),
                },
                {
                    "run_id": rid,
                    "seq": 2,
                    "attempt": 2,
                    "name": "nap",
                    "occurrence": 1,
                    "step_type": "sleep",
                    "status": "completed",
                    "started_at": start + timedelta(seconds=30),
                    "finished_at": None,
                },
            ],
        )
        conn.execute(
            insert(cost_entries),
            [
                {
                    "run_id": rid,
                    "seq": 1,
                    "step_seq": 1,
                    "project": "default",
                    "ts": start,
                    "provider": "openai",
                    "model": "gpt-4o",
                    "tokens_in": 10,
                    "tokens_out": 2,
                    "requests": 1,
                    "cost_usd": "0.0125",
                }
            ],
        )
        conn.execute(
            insert(RunMetric.__table__),
            [
                {"run_id": rid, "ts": start + timedelta(seconds=s), "name": name, "value": v}
                for s in (5, 15, 25)
                for name, v in (("cpu_percent", 10.0 + s), ("rss_bytes", 1048576.0 * s))
            ],
        )
        conn.execute(
            insert(RunArtifact.__table__),
            [
                {
                    "run_id": rid,
                    "name": "report.csv",
                    "path": "/srv/out/report.csv",
                    "size_bytes": 2048,
                    "sha256": "ab" * 32,
                }
            ],
        )
    return run_id


def test_the_timeline_marks_replayed_and_waiting_steps_and_charts_cpu_and_memory(
    pg_api: ApiClient,
) -> None:
    run_id = seed_second_attempt(pg_api)
    with browser(pg_api, "readonly") as reader:
        html = reader.get(f"/runs/{run_id}").text
    assert '<g class="attempt"><title>attempt 1</title>' in html
    assert '<g class="attempt"><title>attempt 2</title>' in html
    assert '<g class="replayed"><title>fetch (completed)</title>' in html
    assert '<g class="waiting"><title>nap (completed)</title>' in html
    steps = {cells[1]: cells for _, cells in table(html, "steps")}
    assert "replayed" in steps["fetch"][3] and "waiting" in steps["nap"][3]
    assert steps["fetch"][7] == "0.0125" and steps["nap"][7] == NONE  # cost per step
    assert 'data-metric="cpu_percent"' in html and 'data-metric="rss_bytes"' in html
    assert f"5.0{NONE}25.0 MiB" in html and f"15.0{NONE}35.0 %" in html
    [(_, artifact)] = table(html, "artifacts")
    assert artifact[:3] == ["report.csv", "/srv/out/report.csv", "2048"]
    assert 'id="signal-form"' not in html  # readonly


def test_a_signal_from_the_page_is_kept_and_audited_and_bad_json_changes_nothing(
    pg_api: ApiClient,
) -> None:
    run_id = seed_second_attempt(pg_api)
    with browser(pg_api, "write") as writer:
        page = writer.get(f"/runs/{run_id}").text
        assert 'id="signal-form"' in page
        token = csrf_of(page)
        bad = writer.post(
            f"/runs/{run_id}/signal",
            data={"csrf_token": token, "name": "approved", "payload": "{nope"},
        )
        assert bad.status_code == 422 and "payload: not JSON" in bad.text
        sent = writer.post(
            f"/runs/{run_id}/signal",
            data={"csrf_token": token, "name": "approved", "payload": '{"by": "ann"}'},
        )
        assert sent.status_code == 303 and sent.headers["location"] == f"/runs/{run_id}"
        forged = writer.post(f"/runs/{run_id}/signal", data={"name": "approved"})
        assert forged.status_code == 403
    with pg_api.state.engine.connect() as conn:
        kept = conn.execute(select(RunSignal.name, RunSignal.payload)).all()
        actions = conn.execute(select(audit_logs.c.action, audit_logs.c.target_id)).all()
    assert [tuple(row) for row in kept] == [("approved", {"by": "ann"})]
    assert ("run.signal", run_id) in [tuple(a) for a in actions]
