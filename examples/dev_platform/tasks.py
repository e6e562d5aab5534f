"""An agent's turn in a conversation: an LLM call billed to the project it belongs to."""

from __future__ import annotations

from typing import Any

from conveyor import task
from examples import fake_llm


@task(name="dev_platform.agent_turn")
def agent_turn(ctx, conversation: str, message: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    with ctx.step("reply", step_type="llm_call"):
        reply = fake_llm.call(ctx, message)
    return {
        "conversation": conversation,
        "reply": reply.text,
        "tokens": reply.tokens_in + reply.tokens_out,
    }
