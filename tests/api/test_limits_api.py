"""/api/v1/limits and `conveyor limits`: rate limits with what the last minute used and who
waits, concurrency keys in use; admins define and remove, audited; bad values named."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, select, text

from domain.clock import utc_now
from domain.db.models import audit_logs, runs
from domain.flow import rates
from tests.api.conftest import ApiClient, create_run, error_of, set_status
from tests.e2e.test_cli import conveyor, ok

BASE = "/api/v1/limits"


def test_define_list_and_remove_a_rate_limit(api: ApiClient) -> None:
    made = api.as_role(
        "admin", "PUT", f"{BASE}/openai", json={"requests_per_minute": 500, "tokens_per_minute": 9}
    )
    assert made.status_code == 200, made.text
    assert made.json() | {"updated_at": None} == {
        "name": "openai",
        "requests_per_minute": 500,
        "tokens_per_minute": 9,
        "defined_in": "api",
        "updated_at": None,
        "requests_used": 0,
        "tokens_used": 0,
        "requests_left": 500,
        "tokens_left": 9,
        "waiting": 0,
    }
    with api.state.engine.begin() as conn:
        assert rates.take(conn, "openai", tokens=4).granted
    listed = api.as_role("readonly", "GET", BASE).json()
    (shown,) = listed["rate_limits"]
    assert (shown["requests_used"], shown["requests_left"], shown["tokens_left"]) == (1, 499, 5)
    assert listed["concurrency"] == []

    changed = api.as_role("admin", "PUT", f"{BASE}/openai", json={"tokens_per_minute": 100})
    assert changed.json()["requests_per_minute"] is None
    assert changed.json()["tokens_used"] == 4  # what the window holds stays counted
    assert api.as_role("admin", "DELETE", f"{BASE}/openai").status_code == 204
    gone = api.as_role("admin", "DELETE", f"{BASE}/openai")
    assert gone.status_code == 404 and "no rate limit named 'openai'" in error_of(gone)["message"]
    assert api.as_role("readonly", "GET", BASE).json()["rate_limits"] == []
    with api.state.engine.connect() as conn:
        actions = conn.execute(
            select(audit_logs.c.action, audit_logs.c.target_id).order_by(audit_logs.c.id)
        ).all()
    assert [tuple(a) for a in actions if a[0].startswith("rate_limit")] == [
        ("rate_limit.define", "openai"),
        ("rate_limit.define", "openai"),
        ("rate_limit.remove", "openai"),
    ]


def test_bad_definitions_name_the_field_and_write_nothing(api: ApiClient) -> None:
    for body, field in (
        ({"requests_per_minute": -1}, "requests_per_minute"),
        ({"tokens_per_minute": 0}, "tokens_per_minute"),
        ({"requests_per_minute": 10**10}, "requests_per_minute"),
        ({"rpm": 5}, "rpm"),
    ):
        refused = api.as_role("admin", "PUT", f"{BASE}/openai", json=body)
        assert refused.status_code == 422, body
        assert field in (error_of(refused).get("field") or error_of(refused)["message"])
    neither = api.as_role("admin", "PUT", f"{BASE}/openai", json={})
    assert neither.status_code == 422
    assert "give requests_per_minute" in error_of(neither)["message"]
    bad_name = api.as_role("admin", "PUT", f"{BASE}/open%20ai", json={"requests_per_minute": 1})
    assert bad_name.status_code == 422
    assert api.as_role("readonly", "GET", BASE).json()["rate_limits"] == []


def test_only_admins_change_limits(api: ApiClient) -> None:
    body = {"requests_per_minute": 5}
    assert api.as_role("write", "PUT", f"{BASE}/x", json=body).status_code == 403
    assert api.as_role("readonly", "DELETE", f"{BASE}/x").status_code == 403
    assert api.get(BASE).status_code == 401


def test_concurrency_keys_in_use_show_running_and_waiting(api: ApiClient) -> None:
    holder = create_run(api, concurrency_key="repo:main")["id"]
    waiter = create_run(api, concurrency_key="repo:main")["id"]
    create_run(api, concurrency_key="repo:idle")  # pending: neither holding nor waiting
    set_status(
        api.state.engine,
        holder,
        "running",
        lease_expires_at=utc_now() + timedelta(seconds=30),
    )
    set_status(api.state.engine, waiter, "waiting", wait_reason="concurrency:repo:main")
    listed = api.as_role("readonly", "GET", BASE).json()
    assert listed["concurrency"] == [{"key": "repo:main", "max": 1, "running": 1, "waiting": 1}]
    detail = api.as_role("readonly", "GET", f"/api/v1/runs/{waiter}").json()
    assert detail["wait_reason"] == "concurrency:repo:main"


def test_the_cli_defines_lists_and_removes(db_url: str, tmp_path: Path) -> None:
    shown = json.loads(
        ok(conveyor("limits", "define", "openai", "--rpm", "20", "--json", db=db_url, cwd=tmp_path))
    )
    assert (shown["requests_per_minute"], shown["defined_in"]) == (20, "cli")
    table = ok(conveyor("limits", "list", db=db_url, cwd=tmp_path))
    assert "openai" in table and "20" in table
    listed = json.loads(ok(conveyor("limits", "list", "--json", db=db_url, cwd=tmp_path)))
    assert [r["name"] for r in listed["rate_limits"]] == ["openai"]
    bad = conveyor("limits", "define", "openai", "--rpm", "-3", db=db_url, cwd=tmp_path)
    assert bad.returncode == 2 and "requests_per_minute: 1 to" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    neither = conveyor("limits", "define", "x", db=db_url, cwd=tmp_path)
    assert neither.returncode == 2 and "give requests_per_minute" in neither.stderr
    assert "removed" in ok(conveyor("limits", "remove", "openai", db=db_url, cwd=tmp_path))
    again = conveyor("limits", "remove", "openai", db=db_url, cwd=tmp_path)
    assert again.returncode == 1 and "no rate limit named 'openai'" in again.stderr
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM rate_limits")).scalar_one() == 0
            assert conn.execute(select(runs.c.id)).first() is None
    finally:
        engine.dispose()
