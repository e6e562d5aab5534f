"""Four jobs: one within budget, one that crashes after its second step and resumes without
paying for the first two again, one stopped by its budget, one cancelled mid-way."""

from __future__ import annotations

import time
from typing import Any

from conveyor import Client


def run(client: Client) -> dict[str, Any]:
    ok = client.enqueue(
        "llm_jobs.job",
        {"task_text": "add tests", "repo": "acme/api"},
        budget_usd="0.01",
        max_requests=5,
        max_minutes=5,
    )
    # Each call has 5 words: 500 tokens in, 250 out = 0.000225 USD. Three fit in 0.01; this job
    # may spend only 0.0003, so reserving its second call is refused before it is made.
    tight = client.enqueue(
        "llm_jobs.job", {"task_text": "add tests", "repo": "acme/api"}, budget_usd="0.0003"
    )
    resumed = client.enqueue(
        "llm_jobs.job", {"task_text": "add tests", "repo": "acme/api", "crash_after": "code"}
    )
    slow = client.enqueue(
        "llm_jobs.job", {"task_text": "rewrite everything", "repo": "acme/api", "pause_s": 5}
    )
    deadline = time.monotonic() + 30
    while client.get(slow.id).status != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    client.cancel(slow.id)
    return {
        "ok": client.wait(ok.id, timeout=60),
        "ok_steps": client.steps(ok.id),
        "tight": client.wait(tight.id, timeout=60),
        "resumed": client.wait(resumed.id, timeout=60),
        "resumed_steps": client.steps(resumed.id),
        "cancelled": client.wait(slow.id, timeout=60),
    }
