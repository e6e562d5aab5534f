"""How `conveyor runs show` prints a step: a visible one by name and status, a checkpointed one
with its occurrence, tries, cost and whether this attempt replayed it."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from conveyor.cli.runs import _step_line
from domain.runs.views import StepView

T0 = datetime(2026, 12, 2, tzinfo=UTC)


def step(**fields: object) -> StepView:
    base: dict[str, object] = {
        "seq": 1,
        "attempt": 1,
        "name": "call",
        "step_type": "step",
        "status": "completed",
        "detail": None,
        "started_at": T0,
        "finished_at": T0,
    }
    return StepView(**{**base, **fields})  # type: ignore[arg-type]


def test_a_visible_step_is_its_name_and_status() -> None:
    assert _step_line(step(), run_attempt=1) == "call: completed"


def test_a_checkpointed_step_shows_occurrence_tries_cost_and_replay() -> None:
    replayed = step(occurrence=2, tries=3, cost_usd=Decimal("0.0100000000"))
    assert _step_line(replayed, run_attempt=2) == "call #2: completed (3 tries, 0.01 USD, replayed)"
    assert _step_line(replayed, run_attempt=1) == "call #2: completed (3 tries, 0.01 USD)"
    failed = step(occurrence=1, status="failed", attempt=2)
    assert _step_line(failed, run_attempt=2) == "call #1: failed"
