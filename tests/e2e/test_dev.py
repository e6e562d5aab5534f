"""The README's quick start: `conveyor dev`, then `conveyor enqueue hello ... --wait`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.stack import ROOT
from tests.polling import eventually
from tests.services import free_port

pytestmark = pytest.mark.slow


def start_dev(
    tmp_path: Path, *args: str
) -> tuple[subprocess.Popen[bytes], Path, int, dict[str, str]]:
    """`conveyor dev` on a free port, in its own session, with output to a file: the process,
    that file, the port and the environment it was started with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update({"CONVEYOR_HOME": str(tmp_path / ".conveyor"), "PYTHONPATH": str(ROOT)})
    out = tmp_path / "dev.out"
    port = free_port()
    with out.open("wb") as sink:
        dev = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "dev", *args, "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return dev, out, port, env


def test_dev_runs_work_enqueued_from_another_process(tmp_path: Path) -> None:
    dev, out, port, env = start_dev(tmp_path)
    try:
        eventually(lambda: "try, in another terminal" in out.read_text(), timeout=30)
        banner = out.read_text()
        assert f"API      http://127.0.0.1:{port}/api/v1/runs  (no token: served to local" in banner
        assert f"docs     http://127.0.0.1:{port}/docs" in banner
        assert f"dashboard http://127.0.0.1:{port}/" in banner
        assert "tasks    flaky, heartbeat, hello, sleepy, summarize" in banner
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

        # This CLI imports no task code (CONVEYOR_TASK_MODULES is unset here): it checks names
        # and params against what the dev worker published, and applies the task's settings.
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "conveyor", *args],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        for args, message in [
            (("helo",), "error: no task or pipeline named 'helo'; did you mean 'hello'?"),
            (("hello", "-p", "name=7"), 'error: params.name: 7 is not of type "string"'),
            (("summarize",), "error: params.text: missing (required)"),
            (("flaky", "-p", "fail_times=1", "-p", "x=1"), "error: params.x: unknown field"),
        ]:
            refused = cli("enqueue", *args)
            assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
            assert refused.stderr.startswith(message), (args, refused.stderr)
            assert refused.stderr.count("\n") == 1  # one line, no traceback
        flaky = cli("enqueue", "flaky", "--wait", "--json", "--timeout", "30")
        assert flaky.returncode == 0, flaky.stderr
        assert json.loads(flaky.stdout)["result"] == {"succeeded_on_attempt": 3}  # max_attempts=3

        # the status API is served on localhost without a token in dev mode
        import httpx

        url = f"http://127.0.0.1:{port}/api/v1/runs?name=hello"
        listed = httpx.get(url, timeout=10).json()
        assert [r["id"] for r in listed["items"]] == [run["id"]]
    finally:
        os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C: drain and stop
        code = dev.wait(timeout=30)
    assert code == 0, out.read_text()[-2000:]
    said = out.read_text()
    assert "Traceback" not in said
    for noise in LIBRARY_NOISE:  # the worker ran, the API served, the scheduler swept: quietly
        assert noise not in said, (noise, said)


# Celery's banner and root warning, kombu's hostname note, APScheduler's job lines, uvicorn's
# access lines.
LIBRARY_NOISE = (
    "[queues]",
    "SecurityWarning",
    "No hostname was supplied",
    "Added job",
    "Scheduler started",
    '"GET /api/v1/runs',
)


def test_dev_verbose_shows_the_libraries(tmp_path: Path) -> None:
    dev, out, port, _ = start_dev(tmp_path, "--verbose")
    try:
        eventually(lambda: "[queues]" in out.read_text(), timeout=30)  # Celery's banner
        eventually(lambda: "Added job" in out.read_text(), timeout=10)  # APScheduler's
        import httpx

        httpx.get(f"http://127.0.0.1:{port}/api/v1/runs", timeout=10)
        eventually(lambda: '"GET /api/v1/runs' in out.read_text(), timeout=10)  # uvicorn's
    finally:
        os.killpg(dev.pid, signal.SIGINT)
        code = dev.wait(timeout=30)
    assert code == 0, out.read_text()[-2000:]


def test_a_second_dev_on_a_taken_port_says_so_and_starts_nothing(tmp_path: Path) -> None:
    import socket

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update({"CONVEYOR_HOME": str(tmp_path / ".conveyor"), "PYTHONPATH": str(ROOT)})
    with socket.socket() as first:  # what the first `conveyor dev` holds
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]
        second = subprocess.run(
            [sys.executable, "-m", "conveyor", "dev", "--port", str(port)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert second.returncode == 1, second.stderr
    assert second.stderr.startswith(f"error: port {port} on 127.0.0.1 (the status API) is already")
    assert second.stderr.count("\n") == 1 and second.stdout == ""
    assert not (tmp_path / ".conveyor").exists()  # checked before any schema or thread
    impossible = subprocess.run(
        [sys.executable, "-m", "conveyor", "dev", "--port", "70000"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert impossible.returncode == 2
    assert impossible.stderr == "error: --port: expected 0-65535, got 70000\n"
