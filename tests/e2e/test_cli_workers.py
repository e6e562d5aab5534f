"""`conveyor workers`: a worker whose heartbeat stopped is shown lost, running nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert

from domain.db.models import Worker
from tests.e2e.test_cli import conveyor, ok


def test_a_silent_worker_is_lost_not_running(sqlite_url: str, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    engine = create_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(Worker.__table__),
                {
                    "id": "frozen@host",
                    "hostname": "host",
                    "pid": 7,
                    "queues": {"names": ["default"]},
                    "started_at": now - timedelta(hours=1),
                    "heartbeat_at": now - timedelta(minutes=5),
                    "running": 3,
                    "stopped": False,
                },
            )
    finally:
        engine.dispose()
    [seen] = json.loads(ok(conveyor("workers", "--json", db=sqlite_url, cwd=tmp_path)))
    assert (seen["id"], seen["state"], seen["running"]) == ("frozen@host", "lost", None)
    [line] = [
        row
        for row in ok(conveyor("workers", db=sqlite_url, cwd=tmp_path)).splitlines()
        if "frozen@host" in row
    ]
    assert line.split()[1:4] == ["lost", "default", "-"]
