"""`conveyor pipelines …` and `conveyor secrets …` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from domain.db.engine import create_db_engine
from domain.security.secrets import secrets_table
from tests.pipeline_support import ROOT, copy_fixtures, make_pipeline

pytestmark = pytest.mark.slow

KEY = Fernet.generate_key().decode()


def conveyor(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    environ.update({"COLUMNS": "200", "PYTHONPATH": str(ROOT), **env})
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=ROOT,
        env=environ,
        input=stdin,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "pipelines"
    root.mkdir()
    copy_fixtures(root, "test_simple", "test_with_requirements")
    make_pipeline(root, "negative", "print(1)\n", {"timeout": -5})
    make_pipeline(root, "typo", "print(1)\n", {"retry_attempt": 2})
    return {
        "CONVEYOR_DATABASE_URL": sqlite_url,
        "CONVEYOR_PIPELINES_DIR": str(root),
        "CONVEYOR_HOME": str(tmp_path / "home"),
        "CONVEYOR_PIPELINE_CACHE_DIR": str(tmp_path / "envs"),
        "CONVEYOR_SECRET_KEY": KEY,
    }


def test_pipelines_list_show_sync_warm(env: dict[str, str]) -> None:
    listed = conveyor("pipelines", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["negative"]["status"] == "invalid"
    assert "key 'timeout': expected a number of seconds >= 0" in rows["negative"]["error"]
    assert rows["typo"]["status"] == "enabled"
    assert "did you mean 'retry_attempts'?" in rows["typo"]["warnings"][0]
    assert rows["test_with_requirements"]["environment"] == "not built"

    table = conveyor("pipelines", "list", env=env).stdout
    assert "invalid" in table and "expected a number of seconds >= 0" in table

    warm = conveyor("pipelines", "warm", "test_with_requirements", "--json", env=env)
    assert warm.returncode == 0, warm.stderr
    assert json.loads(warm.stdout)[0]["environment"] == "uv venv"
    shown = json.loads(
        conveyor("pipelines", "show", "test_with_requirements", "--json", env=env).stdout
    )
    assert shown["environment"] == "ready" and shown["last_cache_warmup"] is not None

    missing = conveyor("pipelines", "show", "nope", env=env)
    assert missing.returncode == 2 and "no task or pipeline named 'nope'" in missing.stderr
    disabled = conveyor("pipelines", "warm", "negative", env=env)
    assert disabled.returncode == 2 and "'negative' is disabled" in disabled.stderr
    synced = json.loads(conveyor("pipelines", "sync", "--json", env=env).stdout)
    assert synced["invalid"] == ["negative"]


def test_secrets_set_list_rm_rotate(env: dict[str, str]) -> None:
    value = "cli-secret-value-123"
    stored = conveyor("secrets", "set", "API_TOKEN", env=env, stdin=value + "\n")
    assert stored.returncode == 0, stored.stderr
    assert value not in stored.stdout + stored.stderr
    conveyor("secrets", "set", "REGION", "--parameter", env=env, stdin="eu-west")
    listed = json.loads(conveyor("secrets", "list", "--json", env=env).stdout)
    assert [(s["name"], s["is_parameter"]) for s in listed] == [
        ("API_TOKEN", False),
        ("REGION", True),
    ]
    assert value not in json.dumps(listed)

    short = conveyor("secrets", "set", "PIN", env=env, stdin="12")
    assert short.returncode == 2 and "at least 4 characters" in short.stderr
    no_key = conveyor("secrets", "set", "X_1", env={**env, "CONVEYOR_SECRET_KEY": ""}, stdin="abcd")
    assert no_key.returncode == 2 and "CONVEYOR_SECRET_KEY is not set" in no_key.stderr

    new_key = Fernet.generate_key().decode()
    rotated = conveyor("secrets", "rotate", env={**env, "CONVEYOR_SECRET_KEY": f"{new_key},{KEY}"})
    assert rotated.returncode == 0 and "2 secret(s)" in rotated.stdout
    engine = create_db_engine(env["CONVEYOR_DATABASE_URL"])
    with engine.connect() as conn:
        tokens = conn.execute(select(secrets_table.c.ciphertext)).scalars().all()
    engine.dispose()
    assert all(Fernet(new_key.encode()).decrypt(t.encode()) for t in tokens)

    assert conveyor("secrets", "rm", "REGION", env=env).returncode == 0
    gone = conveyor("secrets", "rm", "REGION", env=env)
    assert gone.returncode == 1 and "no secret named 'REGION'" in gone.stderr


def test_secrets_encrypt_makes_a_token_for_encrypted_env(env: dict[str, str]) -> None:
    value = "crm-token-e2e-41f7"
    made = conveyor("secrets", "encrypt", env=env, stdin=value + "\n")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert "\n" not in token and value not in made.stdout + made.stderr
    assert Fernet(KEY.encode()).decrypt(token.encode()).decode() == value  # newline dropped
    root = Path(env["CONVEYOR_PIPELINES_DIR"])
    make_pipeline(root, "sealed", "print(1)\n", {"encrypted_env": {"CRM_TOKEN": token}})
    shown = conveyor("pipelines", "show", "sealed", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["status"] == "enabled"
    assert data["config"]["encrypted_env"] == {"CRM_TOKEN": "***"}
    assert token not in shown.stdout and value not in shown.stdout

    # Another key cannot open it: disabled, saying where and why, quoting nothing.
    other = {**env, "CONVEYOR_SECRET_KEY": Fernet.generate_key().decode()}
    listed = conveyor("pipelines", "list", "--json", env=other)
    row = next(r for r in json.loads(listed.stdout) if r["name"] == "sealed")
    assert row["status"] == "invalid"
    assert "sealed/pipeline.json: key 'encrypted_env.CRM_TOKEN': no key" in row["error"]
    assert token not in listed.stdout and value not in listed.stdout


@pytest.mark.parametrize(
    ("key", "stdin", "message"),
    [
        ("", "long-enough", "CONVEYOR_SECRET_KEY is not set"),
        ("not-a-fernet-key", "long-enough", "key #1 is not a Fernet key"),
        (KEY, "abc", "value: at least 4 characters"),
        (KEY, "", "secret value: empty"),
    ],
    ids=["no-key", "bad-key", "short", "empty"],  # not the random key: xdist compares ids
)
def test_secrets_encrypt_refuses_in_one_line(
    env: dict[str, str], key: str, stdin: str, message: str
) -> None:
    done = conveyor("secrets", "encrypt", env={**env, "CONVEYOR_SECRET_KEY": key}, stdin=stdin)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr
    assert "not-a-fernet-key" not in done.stderr
