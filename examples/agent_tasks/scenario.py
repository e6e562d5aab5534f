"""Run the agent-tasks scenario against a running conveyor (worker + scheduler)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from conveyor import Client
from examples.agent_tasks.tasks import BOARD


def board(client: Client, ids: list[Any]) -> dict[str, list[str]]:
    """The orchestrator's view: titles by todo / in_progress / done."""
    columns: dict[str, list[str]] = defaultdict(list)
    for run_id in ids:
        run = client.get(run_id)
        columns[BOARD[run.status]].append(run.params["title"])
    return dict(columns)


def run(client: Client) -> dict[str, Any]:
    titles = [("fix login", 9), ("write docs", 2), ("refactor api", 5), ("triage bugs", 7)]
    runs = client.enqueue_many(
        {"name": "agent_tasks.work", "params": {"title": t}, "priority": p} for t, p in titles
    )
    ids = [r.id for r in runs]
    before = board(client, ids)
    finals = [client.wait(i, timeout=60) for i in ids]
    return {"before": before, "after": board(client, ids), "runs": finals}
