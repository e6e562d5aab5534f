"""Run the agent-tasks scenario against a running conveyor (worker + scheduler): a project is
planned, waits for approval, and runs its todos as child runs once approved."""

from __future__ import annotations

import time
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


def children(client: Client, parent: Any) -> list[Any]:
    return [r for r in client.list(limit=100).items if r.parent_run_id == parent]


def run(client: Client) -> dict[str, Any]:
    todos = [["fix login", 9], ["write docs", 2], ["refactor api", 5], ["triage bugs", 7]]
    project = client.enqueue("agent_tasks.project", {"goal": "ship 1.0", "todos": todos})
    deadline = time.monotonic() + 60
    while client.get(project.id).status != "waiting" and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = client.get(project.id)  # planned, and waiting for a person: no worker held
    before = children(client, project.id)
    client.signal(project.id, "approval", {"ok": True, "by": "ana"}, key="approval-1")
    final = client.wait(project.id, timeout=60)
    ids = [r.id for r in children(client, project.id)]
    return {
        "waiting": waiting,
        "children_before_approval": before,
        "project": final,
        "after": board(client, ids),
        "runs": [client.get(i) for i in ids],
    }
