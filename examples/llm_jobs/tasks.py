"""An LLM coding job: planned steps (analyze, code, review), each a checkpointed LLM call
recorded in the cost ledger, so an attempt that fails after a step resumes after it without
paying for it again; budget_usd, max_requests and max_minutes stop it; it can be cancelled at
any step."""

from __future__ import annotations

from typing import Any

from conveyor import task
from examples import fake_llm

STEPS = ("analyze", "code", "review")


def _answer(ctx, step: str, prompt: str) -> str:  # type: ignore[no-untyped-def]
    ctx.log(f"{step}: calling the model", step=step)
    return fake_llm.call(ctx, prompt).text


@task(name="llm_jobs.job", max_attempts=2, retry_backoff=0.2)
def job(  # type: ignore[no-untyped-def]
    ctx, task_text: str, repo: str, pause_s: float = 0.0, crash_after: str = ""
) -> dict[str, Any]:
    ctx.plan(*STEPS, step_type="llm_call")
    answers = {}
    for step in STEPS:
        ctx.check_cancel()
        prompt = f"{step} {task_text} in {repo}"
        answers[step] = ctx.step(step, _answer, ctx, step, prompt, step_type="llm_call")
        if step == crash_after and ctx.attempt == 1:
            raise ConnectionError(f"the job's machine went away after {step}")
        if pause_s:
            ctx.wait(pause_s)
    return {"repo": repo, "review": answers["review"]}
