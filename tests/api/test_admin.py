"""Audit log (every change: actor, action, target, masked details, address) and the admin
routes for tokens and webhook endpoints."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text

from domain.security.audit import mask
from tests.api.conftest import ApiClient, create_run, error_of


def test_changes_are_audited_with_actor_address_and_masked_details(api: ApiClient) -> None:
    run = create_run(
        api,
        params={"customer": 7, "api_key": "sk-live-123", "nested": {"password": "pw"}},
        idempotency_key="k1",
    )
    again = api.as_role(
        "write",
        "POST",
        "/api/v1/runs",
        json={
            "name": "report",
            "params": {"customer": 7, "api_key": "sk-live-123", "nested": {"password": "pw"}},
            "idempotency_key": "k1",
        },
    )
    assert again.status_code == 200  # a replay changes nothing, so it is not audited
    api.as_role("write", "POST", f"/api/v1/runs/{run['id']}/cancel")
    retried = api.as_role("write", "POST", f"/api/v1/runs/{run['id']}/retry").json()

    page = api.as_role("admin", "GET", "/api/v1/audit?target_type=run").json()
    entries = {e["action"]: e for e in page["items"]}
    assert sorted(entries) == ["run.cancel", "run.create", "run.retry"]
    created = entries["run.create"]
    assert (created["actor"], created["target_id"], created["ip"]) == (
        "write-token",
        run["id"],
        "127.0.0.1",
    )
    assert created["details"]["params"] == {
        "customer": 7,
        "api_key": "***",
        "nested": {"password": "***"},
    }
    assert entries["run.retry"]["details"] == {"new_run_id": retried["id"]}
    assert entries["run.retry"]["ip"] == "127.0.0.1"
    assert entries["run.cancel"]["actor"] == "write-token"
    assert "sk-live-123" not in api.as_role("admin", "GET", "/api/v1/audit").text


def test_audit_pages_and_refuses_a_tampered_cursor(api: ApiClient) -> None:
    for i in range(5):
        create_run(api, params={"i": i})
    first = api.as_role("admin", "GET", "/api/v1/audit?action=run.create&limit=3").json()
    assert len(first["items"]) == 3 and first["next_cursor"]
    rest = api.as_role(
        "admin", "GET", f"/api/v1/audit?action=run.create&cursor={first['next_cursor']}"
    ).json()
    assert len(rest["items"]) == 2 and rest["next_cursor"] is None
    ids = [e["id"] for e in first["items"] + rest["items"]]
    assert ids == sorted(ids, reverse=True)
    for cursor in ["abc", "-1", "1e9", "9" * 19]:
        bad = api.as_role("admin", "GET", "/api/v1/audit", params={"cursor": cursor})
        assert bad.status_code == 422 and error_of(bad)["field"] == "cursor"


def test_tokens_over_http_show_the_token_once(api: ApiClient) -> None:
    created = api.as_role("admin", "POST", "/api/v1/tokens", json={"name": "ci", "role": "write"})
    assert created.status_code == 201
    token = created.json()["token"]
    assert token.startswith("cvy_")
    listed = api.as_role("admin", "GET", "/api/v1/tokens")
    assert token not in listed.text and "token_hash" not in listed.text
    assert {t["name"] for t in listed.json()["items"]} >= {"ci", "admin-token"}
    assert api.get("/api/v1/runs", token=token).status_code == 200
    duplicate = api.as_role("admin", "POST", "/api/v1/tokens", json={"name": "ci", "role": "admin"})
    assert duplicate.status_code == 409
    bad_role = api.as_role("admin", "POST", "/api/v1/tokens", json={"name": "x", "role": "root"})
    assert bad_role.status_code == 422 and error_of(bad_role)["field"] == "role"
    assert api.as_role("admin", "DELETE", "/api/v1/tokens/ci").json()["revoked_at"] is not None
    assert api.get("/api/v1/runs", token=token).status_code == 401
    assert api.as_role("admin", "DELETE", "/api/v1/tokens/ci").status_code == 409
    assert api.as_role("admin", "DELETE", "/api/v1/tokens/nobody").status_code == 404
    actions = [e["action"] for e in api.as_role("admin", "GET", "/api/v1/audit").json()["items"]]
    assert actions[:2] == ["token.revoke", "token.create"]
    assert token not in api.as_role("admin", "GET", "/api/v1/audit").text


def test_webhook_endpoints_over_http_keep_the_secret_out_of_listings(api: ApiClient) -> None:
    created = api.as_role(
        "admin", "POST", "/api/v1/webhooks", json={"name": "github", "target": "build"}
    )
    assert created.status_code == 201
    secret = created.json()["secret"]
    assert created.json()["path"] == "/hooks/github"
    listed = api.as_role("admin", "GET", "/api/v1/webhooks")
    assert [w["name"] for w in listed.json()["items"]] == ["github"]
    assert secret not in listed.text and "ciphertext" not in listed.text
    with api.state.engine.connect() as conn:
        stored = conn.execute(text("SELECT secret_ciphertext FROM webhooks")).scalar_one()
    assert secret not in stored  # encrypted at rest
    assert (
        api.as_role(
            "admin", "POST", "/api/v1/webhooks", json={"name": "github", "target": "b"}
        ).status_code
        == 409
    )
    assert api.as_role("write", "GET", "/api/v1/webhooks").status_code == 403
    assert api.as_role("admin", "DELETE", "/api/v1/webhooks/github").status_code == 204
    assert api.as_role("admin", "DELETE", "/api/v1/webhooks/github").status_code == 404
    assert secret not in api.as_role("admin", "GET", "/api/v1/audit").text


def test_mask_hides_secret_names_and_our_tokens_at_any_depth() -> None:
    assert mask(
        {
            "Authorization": "Bearer x",
            "list": [{"client_secret": "s"}, "cvy_abc", "plain"],
            "db_password": "p",
            "idempotency_key": "k",  # an identifier, not a secret
            "count": 3,
        }
    ) == {
        "Authorization": "***",
        "list": [{"client_secret": "***"}, "***", "plain"],
        "db_password": "***",
        "idempotency_key": "k",
        "count": 3,
    }


@contextmanager
def _audit_rows_refused(api: ApiClient) -> Iterator[None]:
    """A database that refuses audit rows: what an audited change does then shows whether
    its audit row shares the change's transaction. (The trigger goes at the end: the
    PostgreSQL test database outlives the test.)"""
    with api.state.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_logs "
                    "BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'audit refused'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_logs "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_audit()"
                )
            )
    try:
        yield
    finally:
        with api.state.engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                conn.execute(text("DROP TRIGGER refuse_audit"))
            else:
                conn.execute(text("DROP TRIGGER refuse_audit ON audit_logs"))
                conn.execute(text("DROP FUNCTION refuse_audit()"))


def _run_count(api: ApiClient) -> int:
    with api.state.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM runs")).scalar_one())


def test_a_run_whose_audit_row_cannot_be_written_is_not_created(api: ApiClient) -> None:
    """The audit row commits with the run or not at all: creating and retrying leave no run
    behind when the audit row is refused."""
    finished = create_run(api)
    api.as_role("write", "POST", f"/api/v1/runs/{finished['id']}/cancel")
    before = _run_count(api)
    with _audit_rows_refused(api):
        created = api.as_role("write", "POST", "/api/v1/runs", json={"name": "report"})
        retried = api.as_role("write", "POST", f"/api/v1/runs/{finished['id']}/retry")
    assert created.status_code >= 500 and retried.status_code >= 500
    assert _run_count(api) == before
