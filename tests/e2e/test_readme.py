"""The README's "Running it for real" block, run as a user would paste it: only the database
name, the Redis address and the API port are changed (to a fresh database, this session's
private Redis and a free port); every command runs as written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.e2e.stack import ROOT
from tests.services import PG_ADMIN_URL, PrivateRedis, free_port, require_postgres

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def production_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running it for real", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the README's production section has no bash block"
    return match.group(1)


def replace_once(script: str, old: str, new: str) -> str:
    assert old in script, f"the README's block no longer says {old!r}"
    return script.replace(old, new)


def test_the_readme_production_block_works_verbatim(
    redis_server: PrivateRedis, tmp_path: Path
) -> None:
    require_postgres()
    name = f"conveyor_readme_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    port = free_port()
    script = production_block()
    script = replace_once(script, "createdb -h 127.0.0.1 conveyor", f"createdb -h 127.0.0.1 {name}")
    script = replace_once(script, "127.0.0.1:5432/conveyor", f"127.0.0.1:5432/{name}")
    script = replace_once(script, "redis://127.0.0.1:6379/0", redis_server.url(6))
    script = replace_once(script, "--port 8000", f"--port {port}")
    script = replace_once(script, "127.0.0.1:8000", f"127.0.0.1:{port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `conveyor` itself
    log = tmp_path / "block.log"  # a file, not a pipe: the background processes keep it open
    with log.open("wb") as sink:
        shell = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,  # no .env of the checkout is read
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the block's background processes share its group
        )
    try:
        shell.wait(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGTERM)
        shell.wait(timeout=30)
        _drop(name)
    output = log.read_text(errors="replace")
    assert shell.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    listed, _ = json.JSONDecoder().raw_decode(output, output.rindex('{"items"'))  # curl's
    assert [(r["name"], r["status"]) for r in listed["items"]] == [("hello", "succeeded")]
    assert "Hello, world!" in output  # --wait printed the run's logs


def _drop(name: str) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
