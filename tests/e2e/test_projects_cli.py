"""`conveyor projects ... --on-limit`: whether a project's queued runs stop or wait at a limit."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_cli import conveyor, ok


def test_on_limit_is_set_shown_and_checked(sqlite_url: str, tmp_path: Path) -> None:
    def run(*args: str) -> str:
        return ok(conveyor("projects", *args, db=sqlite_url, cwd=tmp_path))

    created = json.loads(run("add", "acme", "--monthly-cost-usd", "1", "--json"))
    assert created["on_limit"] == "stop"
    held = json.loads(run("set-limits", "acme", "--on-limit", "hold", "--json"))
    assert (held["on_limit"], held["monthly_cost_limit_usd"]) == ("hold", "1")
    assert "ON LIMIT" in run("list") and "hold" in run("list")
    bad = conveyor(
        "projects", "set-limits", "acme", "--on-limit", "wait", db=sqlite_url, cwd=tmp_path
    )
    assert bad.returncode == 2
    assert "on_limit: must be one of stop, hold (got 'wait')" in bad.stderr
    assert json.loads(run("show", "acme", "--json"))["on_limit"] == "hold"  # unchanged
