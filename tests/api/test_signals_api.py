"""POST /api/v1/runs/{id}/signals/{name}: kept for the run's ctx.wait_for, once per key,
refused for a run that ended (409) or does not exist (404), writers only."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from domain.db.models import run_signals
from tests.api.conftest import ApiClient, create_run, error_of, set_status


def test_a_signal_is_kept_once_per_key(api: ApiClient) -> None:
    run = create_run(api)
    url = f"/api/v1/runs/{run['id']}/signals/approval"
    sent = api.as_role("write", "POST", url, json={"payload": {"ok": True}, "key": "k"})
    assert sent.status_code == 202, sent.text
    assert (sent.json()["name"], sent.json()["new"]) == ("approval", True)
    again = api.as_role("write", "POST", url, json={"payload": {"ok": False}, "key": "k"})
    assert (again.status_code, again.json()["new"], again.json()["id"]) == (
        202,
        False,
        sent.json()["id"],
    )
    bare = api.as_role("write", "POST", url)  # no body: a signal without payload
    assert bare.status_code == 202 and bare.json()["new"]
    with api.state.engine.connect() as conn:
        payloads = conn.execute(select(run_signals.c.payload).order_by(run_signals.c.id)).all()
    assert [p[0] for p in payloads] == [{"ok": True}, None]


def test_signals_to_ended_or_missing_runs_and_from_readers_are_refused(api: ApiClient) -> None:
    run = create_run(api)
    assert api.as_role("readonly", "POST", f"/api/v1/runs/{run['id']}/signals/a").status_code == 403
    set_status(api.state.engine, run["id"], "succeeded")
    ended = api.as_role("write", "POST", f"/api/v1/runs/{run['id']}/signals/a")
    assert ended.status_code == 409
    assert "already ended as succeeded" in error_of(ended)["message"]
    missing = api.as_role("write", "POST", f"/api/v1/runs/{uuid.uuid4()}/signals/a")
    assert missing.status_code == 404
    bad = api.as_role("write", "POST", f"/api/v1/runs/{run['id']}/signals/a", json={"nope": 1})
    assert bad.status_code == 422 and error_of(bad)["type"] == "invalid_input"
