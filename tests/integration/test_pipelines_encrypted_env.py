"""encrypted_env end to end: the pipeline gets the plaintext, and no stored row, log line, error
or structlog event holds the plaintext or its token, in any form they are printed in."""

from __future__ import annotations

import base64
import hashlib
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, select
from structlog.testing import capture_logs

from domain.db.models_platform import Pipeline
from domain.errors import InvalidInput
from domain.pipelines import store as pipeline_store
from domain.security.crypto import encrypt
from tests.leaks import stored_leaks
from tests.pipeline_support import (
    PipelineHarness,
    make_pipeline,
    tmp_pipeline_harness,
)

KEY = Fernet.generate_key().decode()
OLD_KEY = Fernet.generate_key().decode()
#: Quotes, a backslash, non-ASCII, %, + and a space: every escaping rule has work to do.
PLAIN = 'crm "key" \\ tök€n 7%+1'
TOKEN = encrypt(OLD_KEY, PLAIN)  # made with the old key: the rotation opens it

MAIN = textwrap.dedent(
    """
    import base64, hashlib, json, os, sys, urllib.parse
    value = os.environ["CRM_KEY"]
    print("sha256", hashlib.sha256(value.encode()).hexdigest())
    print("region", os.environ["CRM_REGION"])
    print("plain", value)
    print("json", json.dumps({"k": value}), json.dumps(value, ensure_ascii=False))
    print("repr", repr(value), repr(value.encode()))
    print("url", urllib.parse.quote(value), urllib.parse.quote_plus(value))
    print("b64", base64.b64encode(value.encode()).decode())
    print("::conveyor::" + json.dumps({"event": "metric", "name": value, "value": 1}))
    print("::conveyor::" + json.dumps({"event": "result", "value": {"key": value}}))
    token = json.load(open("pipeline.json"))["encrypted_env"]["CRM_KEY"]
    print("token", token, json.dumps(token))
    print("stderr", value, file=sys.stderr)
    if json.load(sys.stdin).get("fail"):
        sys.exit(f"giving up with {value!r} and {token}")
    """
)


@pytest.fixture
def h(
    engine: Engine, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineHarness]:
    with tmp_pipeline_harness(
        engine, tmp_path, tmp_path_factory, secret_key=f"{KEY},{OLD_KEY}"
    ) as harness:
        yield harness


def forms_to_look_for() -> list[str]:
    """The plaintext and the token, plus encodings tests/leaks.py does not derive itself."""
    raw = PLAIN.encode()
    return [
        PLAIN,
        TOKEN,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        repr(raw)[2:-1],
    ]


def test_the_pipeline_gets_the_value_and_nothing_stored_holds_it(h: PipelineHarness) -> None:
    config = {
        "default_env": {"CRM_REGION": "eu-1"},
        "encrypted_env": {"CRM_KEY": TOKEN},
        "retry_attempts": 0,
    }
    make_pipeline(h.root, "crm_sync", MAIN, config)
    pipeline_store.sync(h.engine, h.runner.directory)  # the pipelines table holds its config
    with capture_logs() as events:
        ok = h.enqueue("crm_sync")
        assert h.run(ok) == "succeeded"
        bad = h.enqueue("crm_sync", {"fail": True})
        assert h.run(bad) == "failed"

    out = h.lines(ok, "stdout")
    assert out[0] == "sha256 " + hashlib.sha256(PLAIN.encode()).hexdigest()  # the real value
    assert out[1] == "region eu-1"
    assert "plain ***" in out and "b64 ***" in out and 'token *** "***"' in out
    env_event = next(f for s, m, f in h.logs(ok) if m == "pipeline environment")
    assert env_event["env"]["CRM_KEY"] == "***" and env_event["env"]["CRM_REGION"] == "eu-1"
    assert (h.get(ok).result or {})["result"] == {"key": "***"}
    assert "giving up with '***' and ***" in (h.get(bad).error or "")

    assert stored_leaks(h.engine, forms_to_look_for()) == []
    logged = repr(events)
    assert not [form for form in forms_to_look_for() if form in logged]
    with h.engine.connect() as conn:
        stored = conn.execute(
            select(Pipeline.__table__.c.config).where(Pipeline.__table__.c.name == "crm_sync")  # type: ignore[attr-defined]
        ).scalar_one()
    assert stored["encrypted_env"] == {"CRM_KEY": "***"}  # names only


def test_a_token_no_key_opens_disables_the_pipeline_without_quoting_it(
    h: PipelineHarness,
) -> None:
    foreign = encrypt(Fernet.generate_key().decode(), PLAIN)
    make_pipeline(h.root, "foreign", MAIN, {"encrypted_env": {"CRM_KEY": foreign}})
    report = pipeline_store.sync(h.engine, h.runner.directory)
    assert report.invalid == ["foreign"]
    with pytest.raises(InvalidInput) as caught:
        h.enqueue("foreign")
    message = str(caught.value)
    assert "foreign/pipeline.json: key 'encrypted_env.CRM_KEY': no key in CONVEYOR_SECRET_KEY" in (
        message
    )
    assert stored_leaks(h.engine, [foreign, PLAIN]) == []
    assert foreign not in message and PLAIN not in message


def test_a_token_that_stops_opening_after_enqueue_fails_the_run_cleanly(
    h: PipelineHarness,
) -> None:
    folder = make_pipeline(
        h.root, "rotated_away", MAIN, {"encrypted_env": {"CRM_KEY": TOKEN}, "retry_attempts": 2}
    )
    run_id = h.enqueue("rotated_away")
    foreign = encrypt(Fernet.generate_key().decode(), PLAIN)
    changed = {"encrypted_env": {"CRM_KEY": foreign}, "retry_attempts": 2}
    (folder / "pipeline.json").write_text(json.dumps(changed))
    assert h.run(run_id) == "failed"
    run = h.get(run_id)
    assert (run.error_type, run.attempt) == ("PipelineDisabled", 1)  # no retry can fix it
    assert "key 'encrypted_env.CRM_KEY': no key in CONVEYOR_SECRET_KEY decrypts it" in (
        run.error or ""
    )
    assert stored_leaks(h.engine, [foreign, TOKEN, PLAIN]) == []
