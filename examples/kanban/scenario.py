"""Move one card through every stage and read its history back."""

from __future__ import annotations

import time
from typing import Any

from conveyor import Client


def run(client: Client, *, card: str = "C-42") -> dict[str, Any]:
    first = client.enqueue("kanban.plan", {"card": card})
    stages = [client.wait(first.id, timeout=60)]
    deadline = time.monotonic() + 60
    while stages[-1].name != "kanban.done" and time.monotonic() < deadline:
        following = [r for r in client.list(limit=50).items if r.parent_run_id == stages[-1].id]
        if following:
            stages.append(client.wait(following[0].id, timeout=60))
        else:
            time.sleep(0.1)
    return {"stages": stages, "logs": {s.name: client.logs(s.id) for s in stages}}
