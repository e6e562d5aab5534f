"""encrypted_env: Fernet tokens opened with CONVEYOR_SECRET_KEY (rotation included), and every
way a value can be wrong naming file, key and reason, never the token or the plaintext."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from domain.pipelines.config import parse_config
from domain.pipelines.discovery import PipelineDirectory, PipelineDisabled
from domain.pipelines.encrypted_env import EncryptedEnvError, open_env
from domain.security.crypto import encrypt
from domain.security.masking import MASK

SRC = "pipelines/sync_crm/pipeline.json"
OLD_KEY = Fernet.generate_key().decode()
NEW_KEY = Fernet.generate_key().decode()
PLAIN = "crm-api-key-5f0c9e"


def test_tokens_open_with_any_key_of_a_rotation() -> None:
    token = encrypt(OLD_KEY, PLAIN)
    opened = open_env({"CRM_KEY": token}, f"{NEW_KEY},{OLD_KEY}", source=SRC)
    assert dict(opened.values) == {"CRM_KEY": PLAIN}
    assert set(opened.masked()) == {PLAIN, token}
    assert PLAIN not in repr(opened) and token not in repr(opened)
    assert repr(opened) == f"OpenedEnv(CRM_KEY={MASK})"


@pytest.mark.parametrize(
    ("token", "key", "reason"),
    [
        (encrypt(OLD_KEY, PLAIN), NEW_KEY, "no key in CONVEYOR_SECRET_KEY decrypts it"),
        (PLAIN, NEW_KEY, "not a Fernet token (make one with `conveyor secrets encrypt`)"),
        (encrypt(NEW_KEY, "abc"), NEW_KEY, "shorter than 4 characters"),
        (encrypt(NEW_KEY, "nul\x00inside"), NEW_KEY, "contains a NUL character"),
    ],
    ids=["another-key", "not-a-token", "too-short", "nul"],  # tokens are random: xdist compares
)
def test_a_value_that_cannot_be_used_names_file_key_and_reason(
    token: str, key: str, reason: str
) -> None:
    with pytest.raises(EncryptedEnvError) as caught:
        open_env({"CRM_KEY": token, "OK_KEY": encrypt(key, "fine-value")}, key, source=SRC)
    message = str(caught.value)
    assert message.startswith(f"{SRC}: key 'encrypted_env.CRM_KEY': ")
    assert reason in message
    assert "OK_KEY" not in message  # only the values that are wrong
    for leak in (token, PLAIN, "abc", "fine-value"):
        assert leak not in message


@pytest.mark.parametrize(
    ("key", "reason"),
    [("", "CONVEYOR_SECRET_KEY is not set"), ("not-a-key", "key #1 is not a Fernet key")],
)
def test_no_usable_key_names_the_setting(key: str, reason: str) -> None:
    with pytest.raises(EncryptedEnvError, match=reason) as caught:
        open_env({"CRM_KEY": encrypt(OLD_KEY, PLAIN)}, key, source=SRC)
    assert str(caught.value).startswith(f"{SRC}: key 'encrypted_env': its values cannot be")
    assert "not-a-key" not in str(caught.value)


def test_the_parsed_config_never_shows_a_token() -> None:
    token = encrypt(OLD_KEY, PLAIN)
    parsed = parse_config(json.dumps({"encrypted_env": {"CRM_KEY": token}}), source=SRC)
    assert parsed.error is None and parsed.warnings == ()
    config = parsed.config
    assert config is not None and config.encrypted_env == {"CRM_KEY": token}
    assert token not in repr(config) and token not in repr(parsed)
    # What is stored (pipelines.config) and shown (API, CLI) holds names only.
    assert config.model_dump(mode="json")["encrypted_env"] == {"CRM_KEY": MASK}
    assert token not in config.model_dump_json()


@pytest.mark.parametrize(
    ("value", "key", "got"),
    [
        ({"CRM_KEY": 12345678}, "encrypted_env.CRM_KEY", "got a number"),
        ({"CRM_KEY": ""}, "encrypted_env.CRM_KEY", "got a string"),
        ("gAAAAAB-a-token-at-the-top", "encrypted_env", "got a string"),
        ({"1BAD": "gAAAAAB-token-of-a-bad-name"}, "encrypted_env.1BAD.[key]", "got a string"),
    ],
)
def test_a_malformed_encrypted_env_names_the_key_without_quoting_it(
    value: object, key: str, got: str
) -> None:
    parsed = parse_config(json.dumps({"encrypted_env": value}), source=SRC)
    assert parsed.config is None and parsed.error is not None
    assert parsed.error.startswith(f"{SRC}: key {key!r}: expected ")
    assert "Fernet tokens" in parsed.error and got in parsed.error
    for leak in ("12345678", "gAAAAAB-a-token-at-the-top", "gAAAAAB-token-of-a-bad-name"):
        assert leak not in parsed.error


def make(root: Path, name: str, config: dict[str, object]) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "main.py").write_text("print('hi')\n")
    (root / name / "pipeline.json").write_text(json.dumps(config))


def test_discovery_opens_values_or_disables_the_pipeline(tmp_path: Path) -> None:
    make(tmp_path, "good", {"encrypted_env": {"CRM_KEY": encrypt(OLD_KEY, PLAIN)}})
    foreign = encrypt(NEW_KEY, PLAIN)
    make(tmp_path, "foreign", {"encrypted_env": {"CRM_KEY": foreign}})
    make(tmp_path, "plain", {"default_env": {"A": "b"}})
    directory = PipelineDirectory(tmp_path, secret_key=OLD_KEY)
    good = directory.get("good")
    assert good.runnable and dict(good.opened_env.values) == {"CRM_KEY": PLAIN}
    assert PLAIN not in repr(good)
    bad = directory.get("foreign")
    assert bad.status == "invalid"
    with pytest.raises(PipelineDisabled) as caught:
        bad.require_runnable()
    message = str(caught.value)
    assert f"{tmp_path.name}/foreign/pipeline.json: key 'encrypted_env.CRM_KEY': " in message
    assert foreign not in message and PLAIN not in message
    assert directory.get("plain").runnable  # the others keep working
    # Without a key, a pipeline with encrypted_env cannot run; one without needs none.
    keyless = PipelineDirectory(tmp_path)
    assert "CONVEYOR_SECRET_KEY is not set" in (keyless.get("good").error or "")
    assert keyless.get("plain").runnable
