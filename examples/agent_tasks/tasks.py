"""Agent tasks: a project is planned, waits for a person's approval (a signal), then runs its
todos as child runs and gathers them; each todo is a run whose todo/in_progress/done are run
states; a standup runs on an interval schedule; stats come from rollups; old runs are archived
by retention."""

from __future__ import annotations

from typing import Any

from conveyor import every, task
from examples import fake_llm

#: The orchestrator's task board, in conveyor's terms.
BOARD = {
    "pending": "todo",
    "waiting": "todo",
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


def _plan(ctx, goal: str, todos: list[list[Any]]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    reply = fake_llm.call(ctx, f"plan {goal}")
    return {"goal": goal, "todos": todos, "notes": reply.text}


@task(name="agent_tasks.project", max_attempts=2, retry_backoff=0.2)
def project(ctx, goal: str, todos: list[list[Any]]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Plan (an LLM call, checkpointed), wait for approval (no worker held), then one child run
    per todo (title, priority), gathered: each paid step runs once, whatever restarts."""
    plan = ctx.step("plan", _plan, ctx, goal, todos, step_type="llm_call")
    approval = ctx.wait_for("approval", timeout="1d")
    if not approval.get("ok"):
        return {"goal": goal, "approved": False, "by": approval.get("by")}
    children = ctx.spawn_many(
        {"name": "agent_tasks.work", "params": {"title": title}, "priority": priority}
        for title, priority in plan["todos"]
    )
    results = ctx.gather(children)
    return {"goal": goal, "approved": True, "done": [r["title"] for r in results]}


@task(name="agent_tasks.standup", schedule=every("1h"))
def standup(ctx) -> dict[str, str]:  # type: ignore[no-untyped-def]
    ctx.log("standup: what is in progress?")
    return {"standup": "held"}
