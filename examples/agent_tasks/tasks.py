"""Agent tasks: each todo is a run; todo/in_progress/done are run states; a standup runs on an
interval schedule; stats come from rollups; old runs are archived by retention."""

from __future__ import annotations

from typing import Any

from conveyor import every, task
from examples import fake_llm

#: The orchestrator's task board, in conveyor's terms.
BOARD = {
    "pending": "todo",
    "running": "in_progress",
    "succeeded": "done",
    "failed": "failed",
    "cancelled": "cancelled",
    "timed_out": "failed",
    "budget_exceeded": "failed",
}


@task(name="agent_tasks.work", max_attempts=2, retry_backoff=0.2)
def work(ctx, title: str, agent: str = "coder") -> dict[str, Any]:  # type: ignore[no-untyped-def]
    with ctx.step("think", step_type="llm_call"):
        reply = fake_llm.call(ctx, f"{agent} works on {title}")
    ctx.log("task done", title=title, agent=agent)
    return {"title": title, "agent": agent, "answer": reply.text}


@task(name="agent_tasks.standup", schedule=every("1h"))
def standup(ctx) -> dict[str, str]:  # type: ignore[no-untyped-def]
    ctx.log("standup: what is in progress?")
    return {"standup": "held"}
