"""Values no column can hold, and durations without a unit, are one line on stderr naming the
option or field, with a usage exit code, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from domain.db.models import projects, runs
from domain.db.models_platform import Schedule
from tests.e2e.test_cli import conveyor


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["enqueue", "t", "--allow-unknown", "--params-json", '{"x":"a\\u0000b"}'],
            "params: text must not contain NUL",
        ),
        (
            ["enqueue", "t", "--allow-unknown", "--delay", "99999999999d"],
            "delay: '99999999999d' is too long",
        ),
        (["enqueue", "t", "--allow-unknown", "--delay", "10"], "delay: 10 what? use 10s, 10m"),
        (
            ["enqueue", "t", "--allow-unknown", "--wait", "--timeout", "-1"],
            "--timeout: expected zero or more seconds",
        ),
        (
            ["schedules", "add", "s", "--target", "t", "--allow-unknown", "--every", "10"],
            "every: 10 what? use 10s",
        ),
        (
            [
                "schedules",
                "add",
                "s",
                "--target",
                "t",
                "--allow-unknown",
                "--every",
                "100000000000000000000d",
            ],
            "every: '100000000000000000000d' is too long",
        ),
        (
            ["projects", "set-limits", "default", "--monthly-cost-usd", "1e30"],
            "monthly_cost_usd: must be below 10,000,000,000 USD",
        ),
        (
            ["migrate", "--revision", "bogus"],
            "revision: Can't locate revision identified by 'bogus'",
        ),
    ],
)
def test_unstorable_values_are_one_line_and_write_nothing(
    sqlite_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    result = conveyor(*args, db=sqlite_url, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(runs)).scalar() == 0
            assert conn.execute(select(func.count()).select_from(Schedule)).scalar() == 0
            limits = select(projects.c.monthly_cost_limit_usd).where(projects.c.name == "default")
            assert conn.execute(limits).scalar() is None
    finally:
        engine.dispose()
