"""The README's quick start: `conveyor dev`, then `conveyor enqueue hello ... --wait`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.stack import ROOT, eventually

pytestmark = pytest.mark.slow


def test_dev_runs_work_enqueued_from_another_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update({"CONVEYOR_HOME": str(tmp_path / ".conveyor"), "PYTHONPATH": str(ROOT)})
    out = tmp_path / "dev.out"
    with out.open("wb") as sink:
        dev = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "dev"],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        eventually(lambda: "try, in another terminal" in out.read_text(), timeout=30)
        assert "tasks: flaky, heartbeat, hello, sleepy, summarize" in out.read_text()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "conveyor",
                "enqueue",
                "hello",
                "-p",
                "name=world",
                "--wait",
                "--json",
                "--timeout",
                "30",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        run = json.loads(result.stdout)
        assert run["status"] == "succeeded"
        assert run["result"] == {"greeting": "Hello, world!"}
        assert [line["message"] for line in run["logs"]] == ["greeting", "Hello, world!"]
    finally:
        os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C: drain and stop
        code = dev.wait(timeout=30)
    assert code == 0, out.read_text()[-2000:]
    assert "Traceback" not in out.read_text()
