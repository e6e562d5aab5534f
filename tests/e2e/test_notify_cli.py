"""`conveyor notify ...` as a user runs it: add, list, rm, key; mistakes as one line."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from domain.callbacks.messages import signing_key
from tests.e2e.test_cli import conveyor, ok

KEY = Fernet.generate_key().decode()


def test_notify_add_list_rm_and_key(sqlite_url: str, tmp_path: Path) -> None:
    url = "https://hooks.example.test/services/T0/B0/s3cret"
    added = json.loads(
        ok(
            conveyor(
                "notify",
                "add",
                "--on",
                "failed,timed_out",
                "--name",
                "report*",
                "--url",
                url,
                "--format",
                "slack",
                "--json",
                db=sqlite_url,
                cwd=tmp_path,
            )
        )
    )
    assert added["on"] == ["failed", "timed_out"] and added["format"] == "slack"
    plain = ok(
        conveyor("notify", "add", "--on", "failed", "--url", url, db=sqlite_url, cwd=tmp_path)
    )
    assert "POST https://hooks.example.test/…" in plain and "s3cret" not in plain

    listing = json.loads(ok(conveyor("notify", "list", "--json", db=sqlite_url, cwd=tmp_path)))
    assert [(r["id"], r["name_pattern"], r["url"]) for r in listing] == [
        (added["id"], "report*", url),
        (added["id"] + 1, None, url),
    ]
    assert "rule 1 removed" in ok(conveyor("notify", "rm", "1", db=sqlite_url, cwd=tmp_path))
    table = ok(conveyor("notify", "list", db=sqlite_url, cwd=tmp_path))
    assert "report*" not in table and "failed" in table

    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            audit = conn.execute(text("SELECT action, details FROM audit_logs ORDER BY id")).all()
    finally:
        engine.dispose()
    assert [a[0] for a in audit] == ["notify.add", "notify.add", "notify.remove"]
    assert "s3cret" not in str(audit)  # the audit log shows the host only

    bad_state = conveyor(
        "notify", "add", "--on", "exploded", "--url", url, db=sqlite_url, cwd=tmp_path
    )
    assert bad_state.returncode == 2 and "is not a state a run ends in" in bad_state.stderr
    bad_url = conveyor(
        "notify", "add", "--on", "failed", "--url", "ftp://x", db=sqlite_url, cwd=tmp_path
    )
    assert bad_url.returncode == 2 and "http:// or https:// URL" in bad_url.stderr
    missing = conveyor("notify", "rm", "99", db=sqlite_url, cwd=tmp_path)
    assert missing.returncode == 1 and "no notification rule with id 99" in missing.stderr

    key = ok(
        conveyor("notify", "key", db=sqlite_url, cwd=tmp_path, env={"CONVEYOR_SECRET_KEY": KEY})
    )
    assert key.strip() == signing_key(KEY)
    no_key = conveyor("notify", "key", db=sqlite_url, cwd=tmp_path)
    assert no_key.returncode == 2 and "CONVEYOR_SECRET_KEY is not set" in no_key.stderr
    for result in (bad_state, bad_url, missing, no_key):
        assert "Traceback" not in result.stderr
