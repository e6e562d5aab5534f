"""A card's workflow: plan -> code -> review -> done, each stage a run chained on the
previous one's success and handed its result; logs typed like the orchestrator's
execution logs (command / output / result)."""

from __future__ import annotations

from typing import Any

from conveyor import task
from examples import fake_llm


def _stage(ctx, stage: str, card: str, notes: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    ctx.log(f"claude --stage {stage} {card}", type="command")
    reply = fake_llm.call(ctx, f"{stage} {card} {notes}")
    ctx.log(reply.text, type="output")
    ctx.log(f"{stage} finished", type="result")
    return {"card": card, "notes": f"{notes} > {stage}"}


@task(name="kanban.plan", on_success="kanban.code")
def plan(ctx, card: str, notes: str = "") -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return _stage(ctx, "plan", card, notes or "backlog")


@task(name="kanban.code", on_success="kanban.review")
def code(ctx, card: str, notes: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return _stage(ctx, "code", card, notes)


@task(name="kanban.review", on_success="kanban.done")
def review(ctx, card: str, notes: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return _stage(ctx, "review", card, notes)


@task(name="kanban.done")
def done(ctx, card: str, notes: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    ctx.log(f"{card} moved to done", type="result")
    return {"card": card, "column": "done", "history": notes}
