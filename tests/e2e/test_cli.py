"""The `conveyor` command as a user runs it: a real process, real output, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def conveyor(
    *args: str, db: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    environ.update({"CONVEYOR_DATABASE_URL": db, "COLUMNS": "200", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_enqueue_list_show_cancel_retry(db_url: str, tmp_path: Path) -> None:
    run = json.loads(
        ok(
            conveyor(
                "enqueue",
                "send_report",
                "-p",
                "customer_id=7",
                "--params-json",
                '{"tags": ["a"]}',
                "--priority",
                "8",
                "--queue",
                "mail",
                "--idempotency-key",
                "r-7",
                "--allow-unknown",  # no worker has published send_report: these are CLI tests
                "--json",
                db=db_url,
                cwd=tmp_path,
            )
        )
    )
    assert run["params"] == {"customer_id": 7, "tags": ["a"]}
    assert (run["priority"], run["queue"], run["triggered_by"]) == (8, "mail", "cli")
    again = json.loads(
        ok(
            conveyor(
                "enqueue",
                "send_report",
                "-p",
                "customer_id=7",
                "--params-json",
                '{"tags": ["a"]}',
                "--priority",
                "8",
                "--queue",
                "mail",
                "--idempotency-key",
                "r-7",
                "--allow-unknown",  # no worker has published send_report: these are CLI tests
                "--json",
                db=db_url,
                cwd=tmp_path,
            )
        )
    )
    assert again["id"] == run["id"]

    listing = json.loads(ok(conveyor("runs", "list", "--json", db=db_url, cwd=tmp_path)))
    assert [r["id"] for r in listing["items"]] == [run["id"]]
    table = ok(conveyor("runs", "list", db=db_url, cwd=tmp_path))
    assert run["id"] in table and "send_report" in table and "pending" in table

    shown = ok(conveyor("runs", "show", run["id"], db=db_url, cwd=tmp_path))
    assert "customer_id" in shown and "mail (priority 8)" in shown

    assert "cancelled" in ok(conveyor("cancel", run["id"], db=db_url, cwd=tmp_path))
    child = json.loads(ok(conveyor("retry", run["id"], "--json", db=db_url, cwd=tmp_path)))
    assert child["parent_run_id"] == run["id"] and child["status"] == "pending"
    pending = json.loads(
        ok(conveyor("runs", "list", "--status", "pending", "--json", db=db_url, cwd=tmp_path))
    )
    assert [r["id"] for r in pending["items"]] == [child["id"]]
    assert ok(conveyor("logs", run["id"], db=db_url, cwd=tmp_path)) == ""


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["enqueue", "t", "--params-json", "{bad"], 2, "--params-json: not valid JSON"),
        (["enqueue", "t", "--params-json", "[1]"], 2, "must be a JSON object"),
        (
            ["enqueue", "t", "--priority", "12"],
            2,
            "priority: Input should be less than or equal to 9",
        ),
        (["enqueue", "t", "--delay", "-5s"], 2, "delay: must not be negative"),
        (
            ["enqueue", "t", "--idempotency-key", "k" * 256],
            2,
            "idempotency_key: String should have at most 255",
        ),
        (
            ["enqueue", "t", "--project", "ghost", "--allow-unknown"],
            2,
            "project: no project named 'ghost'",
        ),
        (["enqueue", "t"], 2, "no task or pipeline named 't'"),
        (["enqueue", "bad name"], 2, "name: "),
        (["runs", "show", "not-a-uuid"], 2, "run id: 'not-a-uuid' is not a UUID"),
        (["runs", "show", "01a20c12-f145-7bba-b4a0-208529ff9a2f"], 1, "no run with id"),
        (["cancel", "01a20c12-f145-7bba-b4a0-208529ff9a2f"], 1, "no run with id"),
        (["runs", "list", "--status", "finished"], 2, "status: unknown status 'finished'"),
        (["runs", "list", "--cursor", "garbage"], 2, "cursor: not a cursor"),
    ],
)
def test_user_mistakes_are_one_line_without_traceback(
    sqlite_url: str, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    result = conveyor(*args, db=sqlite_url, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line


def test_database_down_and_bad_url_are_clear(tmp_path: Path) -> None:
    down = conveyor(
        "migrate", "--wait", "1", db="postgresql://u:hunter2@127.0.0.1:1/x", cwd=tmp_path
    )
    assert down.returncode == 1
    assert "cannot reach the database postgresql+psycopg://u:***@127.0.0.1:1/x" in down.stderr
    assert "hunter2" not in down.stderr + down.stdout
    assert "Traceback" not in down.stderr
    bad = conveyor("runs", "list", db="mysql://x@h/d", cwd=tmp_path)
    assert bad.returncode == 2 and "CONVEYOR_DATABASE_URL" in bad.stderr


def test_migrate_on_a_fresh_directory(tmp_path: Path) -> None:
    env = {"CONVEYOR_HOME": str(tmp_path / "state")}
    assert "is at revision head" in ok(conveyor("migrate", db="", cwd=tmp_path, env=env))
    assert (tmp_path / "state" / "conveyor.db").exists()


def test_help_explains_every_command(tmp_path: Path) -> None:
    out = ok(conveyor("--help", db="", cwd=tmp_path))
    for command in ("enqueue", "runs", "logs", "cancel", "retry", "migrate", "dev"):
        assert command in out
    assert "idempotency-key" in ok(conveyor("enqueue", "--help", db="", cwd=tmp_path))


def test_runs_list_fits_the_terminal(sqlite_url: str, tmp_path: Path) -> None:
    long_name = "nightly_customer_report_generation_for_finance"
    ids = [
        json.loads(
            ok(
                conveyor(
                    "enqueue", name, "--queue", "reports", "--allow-unknown", "--json",
                    db=sqlite_url, cwd=tmp_path,
                )
            )
        )["id"]
        for name in (long_name, "hello")
    ]  # fmt: skip
    narrow = ok(conveyor("runs", "list", db=sqlite_url, cwd=tmp_path, env={"COLUMNS": "80"}))
    lines = narrow.splitlines()
    assert max(len(line) for line in lines) <= 80, narrow
    assert lines[0].split() == ["ID", "NAME", "STATUS", "CREATED"], narrow
    for run_id in ids:  # ids stay whole: they are what `runs show` takes
        assert run_id in narrow
    assert "nightly_customer_report…" in narrow and long_name not in narrow
    assert narrow.count("pending") == 2

    wide = ok(conveyor("runs", "list", db=sqlite_url, cwd=tmp_path, env={"COLUMNS": "200"}))
    assert wide.splitlines()[0].split() == [
        "ID", "NAME", "STATUS", "ATTEMPT", "QUEUE", "CREATED", "DURATION",
    ]  # fmt: skip
    assert long_name in wide and "reports" in wide and "0/1" in wide


@pytest.mark.parametrize(
    ("args", "message", "command"),
    [
        (["enqueue", "--bogus"], "error: No such option: --bogus", "enqueue"),
        (["runs", "show"], "error: Missing argument 'RUN_ID'.", "runs show"),
        (
            ["enqueue", "t", "--priority", "high"],
            "error: Invalid value for '--priority'",
            "enqueue",
        ),
        (["runs", "frobnicate"], "error: No such command 'frobnicate'.", "runs"),
    ],
)
def test_usage_errors_are_one_plain_line(
    tmp_path: Path, args: list[str], message: str, command: str
) -> None:
    result = conveyor(*args, db="", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.endswith(f" (see `conveyor {command} --help`)\n"), result.stderr
    assert result.stderr.count("\n") == 1  # one line: no usage block, no Rich box
    assert not set(result.stderr) & set("╭│╰─"), result.stderr
    assert result.stdout == ""


def test_version_and_readable_help(tmp_path: Path) -> None:
    from importlib.metadata import version

    assert ok(conveyor("--version", db="", cwd=tmp_path)) == f"conveyor {version('conveyor')}\n"
    narrow = {"COLUMNS": "80"}
    enqueue = ok(conveyor("enqueue", "--help", db="", cwd=tmp_path, env=narrow))
    for shown in ("--params-json JSON", "--delay DURATION", "-p, --param KEY=VALUE", "0-9"):
        assert shown in enqueue, enqueue
    schedules = ok(conveyor("schedules", "add", "--help", db="", cwd=tmp_path, env=narrow))
    assert "--every DURATION" in schedules and "--start DATETIME" in schedules, schedules
    for text in (enqueue, schedules):
        assert "<str>" not in text.partition("Options:")[2] and "TEXT" not in text
        assert max(len(line) for line in text.splitlines()) <= 80
        assert not set(text) & set("╭│╰─")


def test_projects_and_costs_commands(sqlite_url: str, tmp_path: Path) -> None:
    created = json.loads(
        ok(
            conveyor(
                "projects",
                "add",
                "acme",
                "--monthly-cost-usd",
                "12.50",
                "--json",
                db=sqlite_url,
                cwd=tmp_path,
            )
        )
    )
    assert (created["name"], created["monthly_cost_limit_usd"], created["spent_usd"]) == (
        "acme",
        "12.5",
        "0",
    )
    changed = json.loads(
        ok(
            conveyor(
                "projects",
                "set-limits",
                "acme",
                "--monthly-tokens",
                "1000",
                "--monthly-cost-usd",
                "none",
                "--json",
                db=sqlite_url,
                cwd=tmp_path,
            )
        )
    )
    assert (changed["monthly_cost_limit_usd"], changed["monthly_token_limit"]) == (None, 1000)
    listing = json.loads(ok(conveyor("projects", "list", "--json", db=sqlite_url, cwd=tmp_path)))
    assert [p["name"] for p in listing] == ["acme", "default"]
    report = json.loads(
        ok(conveyor("costs", "--by", "provider", "--json", db=sqlite_url, cwd=tmp_path))
    )
    assert report == {"groups": [], "total_usd": "0"}
    bad = conveyor(
        "projects", "add", "zero", "--monthly-cost-usd", "0", db=sqlite_url, cwd=tmp_path
    )
    assert bad.returncode == 2 and "a limit of zero would refuse all work" in bad.stderr
    bad = conveyor("costs", "--by", "colour", db=sqlite_url, cwd=tmp_path)
    assert bad.returncode == 2 and "by: expected one of" in bad.stderr


def test_runs_signal_sends_a_payload_once_per_key(db_url: str, tmp_path: Path) -> None:
    run = json.loads(
        ok(conveyor("enqueue", "job", "--allow-unknown", "--json", db=db_url, cwd=tmp_path))
    )
    args = ("runs", "signal", run["id"], "approval", "--payload-json", '{"ok": true}')
    sent = ok(conveyor(*args, "--key", "k1", db=db_url, cwd=tmp_path))
    assert sent.strip() == f"signal approval sent to {run['id']}"
    again = ok(conveyor(*args, "--key", "k1", db=db_url, cwd=tmp_path))
    assert "was sent to" in again and "already" in again
    bad = conveyor(
        "runs", "signal", run["id"], "approval", "--payload-json", "{", db=db_url, cwd=tmp_path
    )
    assert bad.returncode == 2 and "--payload-json: not valid JSON" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
