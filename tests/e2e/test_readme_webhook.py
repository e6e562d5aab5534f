"""The README's webhook example, pasted as a user would: `conveyor webhooks add` as written, then
the curl + openssl block with only the secret and the API's address changed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tests.e2e.stack import ROOT, Stack
from tests.e2e.test_readme import replace_once

SECTION = "## Webhooks"


def webhook_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


@pytest.fixture
def stack(sqlite_url: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(
        sqlite_url,
        tmp_path,
        "memory://",  # the run is created, not worked: no worker needs the broker
        CONVEYOR_SECRET_KEY=Fernet.generate_key().decode(),
        CONVEYOR_TASK_MODULES="examples.hello",  # the README's target, as `conveyor dev` has it
    )
    yield s
    s.stop_all()


def run(script: str, stack: Stack, cwd: Path) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd, env=stack.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_readme_webhook_example_creates_a_run_with_the_body_as_params(
    stack: Stack, tmp_path: Path
) -> None:
    add, send = webhook_blocks()
    api = stack.api()
    stack.env["PATH"] = f"{Path(sys.executable).parent}:{stack.env.get('PATH', '')}"  # conveyor
    printed = run(add, stack, tmp_path)  # as written (its sample output lines are comments)
    secret = next(word for word in printed.split() if word.startswith("whsec_"))

    script = replace_once(send, "whsec_paste-the-secret-here", secret)
    script = replace_once(script, "http://127.0.0.1:8000", api)
    answer = json.loads(run(script, stack, tmp_path))

    run_id = uuid.UUID(answer["run_id"])
    with stack.client() as client:
        created = client.get(run_id)
    assert (created.name, created.triggered_by) == ("hello", "webhook")
    assert created.params == {"name": "world"}  # BODY='{"name": "world"}'
