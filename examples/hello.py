"""The tasks `conveyor dev` starts with: try `conveyor enqueue hello -p name=world --wait`."""

from __future__ import annotations

import logging
import time

from conveyor import every, task

logger = logging.getLogger(__name__)


@task
def hello(ctx, name: str = "world") -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Greets someone: a step, a log line with fields, a print, a metric and a result."""
    with ctx.step("greet"):
        ctx.log("greeting", name=name)
        print(f"Hello, {name}!")
    ctx.metric("greetings", 1)
    return {"greeting": f"Hello, {name}!"}


@task(schedule=every("1m"))
def heartbeat(ctx) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Runs every minute under `conveyor dev`: the example schedule (`conveyor schedules list`)."""
    ctx.log("still here")
    return {"at": ctx.params.get("at", "now")}


@task(timeout=300)
def sleepy(ctx, seconds: float = 5.0) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Works for a while, checking for cancellation: try `conveyor cancel ID` while it runs."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        ctx.check_cancel()
        ctx.wait(0.1)
    return {"slept": round(time.monotonic() - started, 3)}


@task(max_attempts=3, retry_backoff=0.5)
def flaky(ctx, fail_times: int = 2) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Fails its first `fail_times` attempts, then succeeds: retries with backoff at work."""
    if ctx.attempt <= fail_times:
        logger.warning("attempt %s fails on purpose", ctx.attempt)
        raise RuntimeError(f"attempt {ctx.attempt} failed on purpose")
    return {"succeeded_on_attempt": ctx.attempt}


@task
def summarize(ctx, text: str, model: str = "fake-mini") -> dict[str, object]:  # type: ignore[no-untyped-def]
    """A stand-in for an LLM call: records tokens and dollars against the run's budget."""
    tokens_in, tokens_out = len(text.split()) * 2, 12
    with ctx.step("llm", step_type="llm_call"):
        ctx.cost(
            provider="fake", model=model, tokens_in=tokens_in, tokens_out=tokens_out, usd="0.00042"
        )
    return {"summary": text[:40], "tokens": tokens_in + tokens_out}
