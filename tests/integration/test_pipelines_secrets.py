"""Secrets: encrypted at rest, rotated, injected only where named, never in stored logs."""

from __future__ import annotations

import hashlib
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, select, text

from domain.db.models import run_logs, runs
from domain.errors import ConfigurationError
from domain.security.secrets import SecretKeyError, SecretNotFound, SecretStore, secrets_table
from tests.leaks import stored_leaks
from tests.pipeline_support import (
    FIXTURES,
    ROOT,
    PipelineHarness,
    make_pipeline,
    tmp_pipeline_harness,
)

KEY = Fernet.generate_key().decode()
TOKEN = "tok-8c1f4e2a-secret"
#: What escaping rules care about: quotes, backslash, non-ASCII, %, +, /, space.
SHAPED = 'sh"ap\\ed-tökén/€ 50%+1'
FILE_TOKEN = "file-token-93be11"


@pytest.fixture
def store(engine: Engine) -> SecretStore:
    return SecretStore(engine, KEY)


def test_set_list_rm_and_values(store: SecretStore, engine: Engine) -> None:
    assert store.set("API_TOKEN", TOKEN) is True
    assert store.set("API_TOKEN", TOKEN + "-2") is False  # replaced
    store.set("REGION", "eu", is_parameter=True)
    assert [(s.name, s.is_parameter) for s in store.list_all()] == [
        ("API_TOKEN", False),
        ("REGION", True),
    ]
    with engine.connect() as conn:
        stored = conn.execute(select(secrets_table.c.ciphertext)).scalars().all()
    assert all(TOKEN not in c and c != "eu" for c in stored)  # encrypted at rest
    values = store.values(["API_TOKEN", "REGION"])
    assert values["API_TOKEN"].value == TOKEN + "-2" and values["REGION"].is_parameter
    assert TOKEN not in repr(values)
    with pytest.raises(SecretNotFound, match="'NOPE'"):
        store.values(["API_TOKEN", "NOPE"])
    store.remove("REGION")
    with pytest.raises(SecretNotFound):
        store.remove("REGION")


def test_rotation_and_wrong_or_missing_keys(engine: Engine) -> None:
    old = SecretStore(engine, KEY)
    old.set("API_TOKEN", TOKEN)
    new_key = Fernet.generate_key().decode()
    with pytest.raises(SecretKeyError, match="cannot be decrypted with CONVEYOR_SECRET_KEY"):
        SecretStore(engine, new_key).verify()
    both = SecretStore(engine, f"{new_key},{KEY}")
    assert both.rotate() == 1
    assert SecretStore(engine, new_key).values(["API_TOKEN"])["API_TOKEN"].value == TOKEN
    with pytest.raises(ConfigurationError, match="CONVEYOR_SECRET_KEY is not set"):
        SecretStore(engine, "").verify()
    with pytest.raises(ConfigurationError, match="is not a Fernet key"):
        SecretStore(engine, "not-a-key").set("X_Y", "value")


@pytest.fixture
def h(
    engine: Engine, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineHarness]:
    with tmp_pipeline_harness(engine, tmp_path, tmp_path_factory, secret_key=KEY) as harness:
        yield harness


def stored_text(engine: Engine) -> str:
    """Everything a run left in the database that a person could read."""
    with engine.connect() as conn:
        logs = conn.execute(select(run_logs.c.message, run_logs.c.fields)).all()
        rows = conn.execute(select(runs.c.error, runs.c.result, runs.c.params)).all()
    return repr(logs) + repr(rows)


def test_a_secret_reaches_the_pipeline_but_never_the_stored_logs(h: PipelineHarness) -> None:
    SecretStore(h.engine, KEY).set("API_TOKEN", TOKEN)
    SecretStore(h.engine, KEY).set("UNNAMED_SECRET", "other-secret-value")
    shutil.copytree(ROOT / "pipelines" / "with_secret", h.root / "with_secret")
    make_pipeline(
        h.root,
        "leaky",
        textwrap.dedent(
            """
            import os, sys
            token = os.environ["API_TOKEN"]
            print("token:", token)
            print(f"::conveyor::{{\\"event\\": \\"log\\", \\"message\\": \\"{token}\\"}}")
            print("unnamed:", os.environ.get("UNNAMED_SECRET"))
            sys.exit(f"failing with {token} in the message")
            """
        ),
        {"secrets": ["API_TOKEN"], "retry_attempts": 0},
    )
    ok = h.enqueue("with_secret")
    assert h.run(ok) == "succeeded"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()[:12]
    assert h.lines(ok, "stdout") == [
        f"got a token of {len(TOKEN)} characters (sha256 {digest}...)",
        "the token is ***",
    ]
    env_event = next(f for s, m, f in h.logs(ok) if m == "pipeline environment")
    assert env_event["env"]["API_TOKEN"] == "***"

    bad = h.enqueue("leaky")
    assert h.run(bad) == "failed"
    assert h.lines(bad, "stdout")[:2] == ["token: ***", "unnamed: None"]  # only named ones
    assert "***" in h.lines(bad, "log")
    assert "failing with *** in the message" in (h.get(bad).error or "")
    assert TOKEN not in stored_text(h.engine)


def test_a_missing_secret_fails_the_run_clearly(h: PipelineHarness) -> None:
    make_pipeline(h.root, "needs", "print(1)\n", {"secrets": ["NOT_STORED"]})
    run_id = h.enqueue("needs")
    assert h.run(run_id) == "failed"
    run = h.get(run_id)
    assert run.error_type == "SecretNotFound"
    assert "no stored secret named 'NOT_STORED'" in (run.error or "")


def test_startup_refuses_a_wrong_key(h: PipelineHarness, engine: Engine) -> None:
    SecretStore(engine, Fernet.generate_key().decode()).set("API_TOKEN", TOKEN)
    with pytest.raises(SecretKeyError):
        h.runner.startup()
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM secrets"))
    h.runner.startup()  # no secrets stored: any key (or none) will do


def test_no_serialized_form_of_a_secret_is_stored(h: PipelineHarness) -> None:
    """The pipeline prints its secrets plain, as JSON both ways, repr, URL-encoded, base64, in
    events of every kind and in artifact names: no column of any table holds any form."""
    store = SecretStore(h.engine, KEY)
    store.set("SHAPED_TOKEN", SHAPED)
    store.set("FILE_TOKEN", FILE_TOKEN)
    shutil.copytree(FIXTURES / "leaky_shapes", h.root / "leaky_shapes")
    ok, bad = h.enqueue("leaky_shapes"), h.enqueue("leaky_shapes", {"fail": True})
    assert h.run(ok) == "succeeded"
    assert h.run(bad) == "failed"
    # The start of the value, in front of where a 64 KiB line was cut, is a secret too.
    assert stored_leaks(h.engine, [SHAPED, FILE_TOKEN, "x" + SHAPED[:4]]) == []

    # Masked where it was, not dropped: the records are all there.
    lines = h.lines(ok)
    assert "plain: ***" in lines and '{"token": "***"}' in lines
    assert "WARNING:careless:logged '***'" in lines
    steps = h.steps(ok)
    assert steps[0] == ("step ***", "failed", "PipelineStepFailed: detail ***")
    assert steps[1][0] == "x" * 195 + "***"
    assert "metric ***" in h.metrics(ok)
    result = h.get(ok).result or {}
    assert result["result"] == {"token": "***", "***": ["'***'"], "file": "***"}
    assert sorted(result["artifacts"]) == ["dir-***/inner.txt", "q-***.bin", "report-***.txt"]
    # Renamed on disk too, so the stored path is the file's real place.
    for artifact in h.artifacts(ok):
        assert Path(artifact["path"]).is_file(), artifact
    assert not any(FILE_TOKEN in str(p) for p in (h.root.parent / "artifacts").rglob("*"))
    assert "failing with '***' and \"***\"" in (h.get(bad).error or "")
