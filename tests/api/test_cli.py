"""`conveyor tokens ...` and `conveyor webhooks ...` as a user runs them: secrets printed once,
stored hashed or encrypted, every change audited, mistakes as one line."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import create_engine, text

from domain.security import tokens as auth
from tests.api.conftest import SECRET_KEY
from tests.e2e.test_cli import conveyor, ok

ENV = {"CONVEYOR_SECRET_KEY": SECRET_KEY}


def test_tokens_create_list_revoke(db_url: str, tmp_path: Path) -> None:
    created = json.loads(
        ok(conveyor("tokens", "create", "ci", "--role", "write", "--json", db=db_url, cwd=tmp_path))
    )
    token = created["token"]
    assert created["role"] == "write" and token.startswith("cvy_")
    listing = ok(conveyor("tokens", "list", db=db_url, cwd=tmp_path))
    assert "ci" in listing and "write" in listing and token not in listing
    as_json = json.loads(ok(conveyor("tokens", "list", "--json", db=db_url, cwd=tmp_path)))
    assert [(t["name"], t["revoked_at"]) for t in as_json] == [("ci", None)]

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT token_hash FROM api_tokens")).scalar_one()
            assert stored == auth.hash_token(token) and token not in stored
        assert "revoked" in ok(conveyor("tokens", "revoke", "ci", db=db_url, cwd=tmp_path))
        with engine.connect() as conn:
            actions = conn.execute(
                text("SELECT actor, action, target_id FROM audit_logs ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    assert [tuple(a) for a in actions] == [
        ("cli", "token.create", "ci"),
        ("cli", "token.revoke", "ci"),
    ]

    again = conveyor("tokens", "revoke", "ci", db=db_url, cwd=tmp_path)
    assert again.returncode == 1 and "already revoked" in again.stderr
    duplicate = conveyor("tokens", "create", "ci", db=db_url, cwd=tmp_path)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    bad_role = conveyor("tokens", "create", "x", "--role", "root", db=db_url, cwd=tmp_path)
    assert bad_role.returncode == 2 and "role: expected one of" in bad_role.stderr
    assert "Traceback" not in again.stderr + duplicate.stderr + bad_role.stderr


def test_webhooks_add_list_rm(db_url: str, tmp_path: Path) -> None:
    # No worker has published a task named build: refused, unless the caller says it is coming.
    unknown = conveyor(
        "webhooks", "add", "gh", "--target", "build", db=db_url, cwd=tmp_path, env=ENV
    )
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: no task or pipeline named 'build'")
    added = conveyor(
        "webhooks", "add", "gh", "--target", "build", "--allow-unknown",
        db=db_url, cwd=tmp_path, env=ENV,
    )  # fmt: skip
    out = ok(added)
    assert "POST /hooks/gh" in out and "whsec_" in out
    secret = next(word for word in out.split() if word.startswith("whsec_"))
    listing = ok(conveyor("webhooks", "list", "--json", db=db_url, cwd=tmp_path, env=ENV))
    assert secret not in listing
    assert [(w["name"], w["target_name"]) for w in json.loads(listing)] == [("gh", "build")]
    assert "removed" in ok(conveyor("webhooks", "rm", "gh", db=db_url, cwd=tmp_path, env=ENV))
    gone = conveyor("webhooks", "rm", "gh", db=db_url, cwd=tmp_path, env=ENV)
    assert gone.returncode == 1 and "no webhook named 'gh'" in gone.stderr


def test_webhook_secrets_need_a_secret_key(sqlite_url: str, tmp_path: Path) -> None:
    missing = conveyor("webhooks", "add", "gh", "--target", "build", db=sqlite_url, cwd=tmp_path)
    assert missing.returncode == 2 and "CONVEYOR_SECRET_KEY is not set" in missing.stderr
    wrong = conveyor(
        "webhooks",
        "add",
        "gh",
        "--target",
        "build",
        db=sqlite_url,
        cwd=tmp_path,
        env={"CONVEYOR_SECRET_KEY": "hunter2"},
    )
    assert wrong.returncode == 2 and "not a Fernet key" in wrong.stderr
    assert "hunter2" not in wrong.stderr


def test_api_without_auth_only_on_localhost(sqlite_url: str, tmp_path: Path) -> None:
    refused = conveyor("api", "--host", "0.0.0.0", "--no-auth", db=sqlite_url, cwd=tmp_path)
    assert refused.returncode == 2 and "only allowed when bound to localhost" in refused.stderr
