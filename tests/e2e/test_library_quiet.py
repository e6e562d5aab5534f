"""conveyor as a library says nothing unless the program asks; conveyor's commands still log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.e2e.stack import ROOT
from tests.polling import eventually

PROGRAM = """
import sys
{setup}
from conveyor import Client
from domain.settings import Settings

with Client(Settings(database_url=sys.argv[1])) as client:
    run = client.enqueue("report", {{"customer": "acme"}}, allow_unknown=True)
    client.get(run.id)
    client.list(limit=5)
"""


def program(db: str, cwd: Path, setup: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", PROGRAM.format(setup=setup), db],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def runs_in(db: str) -> int:
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM runs")).scalar_one())
    finally:
        engine.dispose()


def test_a_program_using_client_sees_no_output_from_conveyor(
    sqlite_url: str, tmp_path: Path
) -> None:
    quiet = program(sqlite_url, tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("", "")
    assert runs_in(sqlite_url) == 1  # it did enqueue: there was something to log

    # The events go to stdlib logging under `conveyor`: a program that shows its logs sees them.
    shown = program(
        sqlite_url,
        tmp_path,
        setup="import logging; logging.basicConfig(level=logging.DEBUG, "
        "format='%(name)s %(levelname)s %(message)s')",
    )
    assert shown.returncode == 0, shown.stderr
    assert "conveyor.runs DEBUG run.enqueued run_id=" in shown.stderr, shown.stderr
    assert "name=report" in shown.stderr and shown.stdout == ""


def test_conveyor_worker_still_logs(sqlite_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "CONVEYOR_DATABASE_URL": sqlite_url,
            "CONVEYOR_BROKER_URL": "memory://",
            "CONVEYOR_LOG_FORMAT": "json",
        }
    )
    err = tmp_path / "worker.err"
    with err.open("wb") as sink:
        worker = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", "-P", "solo"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=sink,
            start_new_session=True,
        )  # fmt: skip
    try:
        eventually(lambda: " ready." in err.read_text(), timeout=30)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
    logged = err.read_text()
    assert '"event": "worker.shutting_down"' in logged, logged  # conveyor's own event, rendered
