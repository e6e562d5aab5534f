"""Bulk cancel and retry from the dashboard's runs page, on PostgreSQL: a confirmation page
counts what the filter matches, and its form changes exactly those runs, never one made later."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, insert, select

from domain.db.models import audit_logs, runs
from domain.runs import bulk
from tests.api.conftest import ApiClient
from tests.api.pages import csrf_of, table
from tests.api.test_dashboard import browser, status_of
from tests.runs_seed import insert_run

pytestmark = pytest.mark.postgres


def hidden_fields(html: str) -> dict[str, list[str]]:
    """The hidden inputs of the confirmation form, each name with its values."""
    fields: dict[str, list[str]] = {}
    for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', html):
        fields.setdefault(name, []).append(value)
    return fields


def hidden_field(html: str) -> dict[str, str]:
    return {name: values[0] for name, values in hidden_fields(html).items()}


def children_of(api: ApiClient, parent: uuid.UUID) -> list[uuid.UUID]:
    with api.state.engine.connect() as conn:
        found = conn.execute(select(runs.c.id).where(runs.c.parent_run_id == parent))
        return list(found.scalars())


def audit_actions(api: ApiClient) -> list[str]:
    with api.state.engine.connect() as conn:
        return list(conn.execute(select(audit_logs.c.action).order_by(audit_logs.c.id)).scalars())


def test_runs_filter_by_error_text_and_time_range(pg_api: ApiClient) -> None:
    engine = pg_api.state.engine
    now = datetime.now(UTC).replace(microsecond=0)
    hour_ago = now - timedelta(hours=1)
    wanted = insert_run(engine, status="failed", error="Timeout talking to 100%_db", created_at=now)
    insert_run(engine, status="failed", error="Timeout talking to db", created_at=hour_ago)
    insert_run(engine, status="failed", error="KeyError: 'x'", created_at=now)
    insert_run(engine, status="failed", error="timeout talking to 100xxdb", created_at=now)

    since = (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S")
    with browser(pg_api, "readonly") as reader:
        page = reader.get("/runs", params={"error": "TIMEOUT talking to 100%_", "after": since})
        assert [attrs["data-run"] for attrs, _ in table(page.text, "runs")] == [str(wanted)]
        assert f'value="{since}"' in page.text  # the form keeps what was typed
        old = reader.get("/runs", params={"before": since, "error": "timeout"}).text
        assert len(table(old, "runs")) == 1
        listed = pg_api.as_role("readonly", "GET", "/api/v1/runs", params={"error": "100%_"})
        assert [item["id"] for item in listed.json()["items"]] == [str(wanted)]  # as the API
        bad = reader.get("/runs", params={"after": "yesterday"})
        assert bad.status_code == 422 and "after: not a time" in bad.text
        assert "<html" in bad.text


def test_bulk_retry_of_a_filter_changes_exactly_the_runs_it_counted(pg_api: ApiClient) -> None:
    engine = pg_api.state.engine
    now = datetime.now(UTC)
    matched = [
        insert_run(
            engine,
            "embed",
            status="failed",
            error="rate limited by upstream",
            created_at=now - timedelta(seconds=10 + i),
        )
        for i in range(3)
    ]
    other_error = insert_run(engine, "embed", status="failed", error="bad input")
    unfinished = insert_run(engine, "embed", status="pending", error="rate limited earlier")
    other_name = insert_run(engine, "report", status="failed", error="rate limited by upstream")
    query = {"name": "embed", "error": "rate limited", "action": "retry"}

    with browser(pg_api, "write") as writer:
        confirm = writer.get("/runs/bulk", params=query)
        assert confirm.status_code == 200, confirm.text
        assert 'data-count="3"' in confirm.text and "Retry 3 runs" in confirm.text
        late = insert_run(engine, "embed", status="failed", error="rate limited too")  # after
        form = hidden_field(confirm.text)
        assert form["action"] == "retry" and form["error"] == "rate limited"
        done = writer.post("/runs/bulk", data=form)
        assert done.status_code == 200, done.text
        assert 'id="bulk-done" data-count="3"' in done.text

    for run_id in matched:
        [child] = children_of(pg_api, run_id)
        assert status_of(pg_api, child) == "pending"
        assert status_of(pg_api, run_id) == "failed"  # the old run stays as it ended
    for untouched in (other_error, unfinished, other_name, late):
        assert children_of(pg_api, untouched) == []
    assert audit_actions(pg_api).count("run.retry") == 3
    assert audit_actions(pg_api).count("runs.bulk_retry") == 1


def test_bulk_cancel_of_a_selection_cancels_only_the_selected(pg_api: ApiClient) -> None:
    engine = pg_api.state.engine
    first, second, third = (insert_run(engine, "sync") for _ in range(3))
    ended = insert_run(engine, "sync", status="succeeded")
    picked = [("id", str(first)), ("id", str(second)), ("id", str(ended))]

    with browser(pg_api, "write") as writer:
        listing = writer.get("/runs", params={"name": "sync"}).text
        assert f'name="id" value="{first}"' in listing and 'id="cancel-selected"' in listing
        confirm = writer.get("/runs/bulk", params=[*picked, ("action", "cancel")])
        assert 'data-count="2"' in confirm.text  # the finished one cannot be cancelled
        done = writer.post("/runs/bulk", data=hidden_fields(confirm.text))
        assert 'data-count="2"' in done.text
        # The selection's buttons with nothing ticked ask for a tick, not for every run.
        none = writer.get("/runs/bulk", params={"selection": "1", "action": "cancel"})
        assert none.status_code == 422 and "tick the runs" in none.text

    assert [status_of(pg_api, r) for r in (first, second, third, ended)] == [
        "cancelled",
        "cancelled",
        "pending",
        "succeeded",
    ]
    assert audit_actions(pg_api).count("run.cancel") == 2


def test_bulk_past_the_cap_is_refused_with_a_clear_page(pg_api: ApiClient) -> None:
    now = datetime.now(UTC)
    flood = [
        {
            "id": uuid.uuid4(),
            "name": "flood",
            "status": "failed",
            "created_at": now,
            "not_before": now,
            "finished_at": now,
        }
        for _ in range(bulk.MAX_BULK + 1)
    ]
    with pg_api.state.engine.begin() as conn:
        conn.execute(insert(runs), flood)
    with browser(pg_api, "write") as writer:
        refused = writer.get("/runs/bulk", params={"name": "flood", "action": "retry"})
    assert refused.status_code == 422
    assert "more than 10,000 runs" in refused.text and "narrow the filter" in refused.text
    with pg_api.state.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(runs)).scalar_one() == 10_001


def test_bulk_needs_write_a_csrf_token_and_a_bound_it_wrote(pg_api: ApiClient) -> None:
    run_id = insert_run(pg_api.state.engine, "sync")
    with browser(pg_api, "readonly") as reader, browser(pg_api, "write") as writer:
        listing = reader.get("/runs").text
        assert 'name="id"' not in listing and "/runs/bulk" not in listing
        assert reader.get("/runs/bulk?action=cancel").status_code == 403
        token = csrf_of(listing)
        refused = reader.post(
            "/runs/bulk", data={"csrf_token": token, "action": "cancel", "bound": "x"}
        )
        assert refused.status_code == 403 and "needs write" in refused.text

        confirm = writer.get("/runs/bulk", params={"action": "cancel"})
        form = hidden_field(confirm.text)
        forged = {k: v for k, v in form.items() if k != "csrf_token"}
        assert writer.post("/runs/bulk", data=forged).status_code == 403
        bad = writer.post("/runs/bulk", data={**form, "bound": "not-a-bound"})
        assert bad.status_code == 422 and "bound:" in bad.text
        unknown = writer.post("/runs/bulk", data={**form, "action": "delete"})
        assert unknown.status_code == 422 and "action:" in unknown.text
    assert status_of(pg_api, run_id) == "pending"
    assert "run.cancel" not in audit_actions(pg_api)
