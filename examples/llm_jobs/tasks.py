"""An LLM coding job: planned steps (analyze, code, review) run in order, each an LLM call
recorded in the cost ledger; budget_usd, max_requests and max_minutes stop it; it can be
cancelled at any step."""

from __future__ import annotations

from typing import Any

from conveyor import task
from examples import fake_llm

STEPS = ("analyze", "code", "review")


@task(name="llm_jobs.job")
def job(ctx, task_text: str, repo: str, pause_s: float = 0.0) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    ctx.plan(*STEPS, step_type="llm_call")
    answers = {}
    for step in STEPS:
        ctx.check_cancel()
        with ctx.step(step):
            answers[step] = fake_llm.call(ctx, f"{step} {task_text} in {repo}").text
            ctx.log(f"{step} done", step=step)
        if pause_s:
            ctx.wait(pause_s)
    return {"repo": repo, "review": answers["review"]}
