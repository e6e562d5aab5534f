"""A delivery's Celery task state follows its run: SUCCESS only for a run that succeeded."""

from __future__ import annotations

import pickle
import uuid

import pytest
from celery.exceptions import Ignore, Retry

from worker.outcomes import Outcome
from worker.task_states import MAX_SHOWN_CHARS, RunFailed, task_result

RUN = uuid.uuid4()


def test_a_run_that_succeeded_returns_its_status() -> None:
    assert task_result(Outcome(RUN, "succeeded", 1)) == "succeeded"


@pytest.mark.parametrize(
    ("status", "error_type", "error", "shown"),
    [
        ("failed", "ValueError", "boom\n\nTraceback ...", "failed: ValueError: boom"),
        ("timed_out", "RunTimedOut", "exceeded its 1s timeout", "timed_out: RunTimedOut: exc"),
        ("budget_exceeded", "BudgetExceeded", "spent $2.00 of $1.00", "budget_exceeded: Bud"),
        ("cancelled", "RunCancelled", "", "cancelled: RunCancelled"),
    ],
)
def test_a_run_that_ended_otherwise_fails_the_task_with_its_error(
    status: str, error_type: str, error: str, shown: str
) -> None:
    with pytest.raises(RunFailed) as raised:
        task_result(Outcome(RUN, status, 3, error_type, error))
    assert str(raised.value).startswith(shown)
    assert "Traceback" not in str(raised.value)  # the first line only
    # A prefork pool sends it back to the parent process, which sends the task-failed event.
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)


def test_a_scheduled_retry_is_celery_retry_raised_not_a_second_message() -> None:
    with pytest.raises(Retry) as raised:
        task_result(Outcome(RUN, "retrying", 1, "OSError", "reset by peer", retry_in_s=2.345))
    retry = raised.value
    assert isinstance(retry.exc, RunFailed)
    assert str(retry.exc) == "retrying: OSError: reset by peer"
    assert retry.when == 2.3 and retry.sig is None  # nothing to publish: conveyor re-queues
    assert pickle.loads(pickle.dumps(retry)).exc.args == retry.exc.args


@pytest.mark.parametrize("status", ["dropped", "lease_lost", "finish_failed"])
def test_a_delivery_that_tells_nothing_about_its_run_is_ignored(status: str) -> None:
    with pytest.raises(Ignore):
        task_result(Outcome(RUN, status, 1))


def test_a_long_error_is_cut_short() -> None:
    with pytest.raises(RunFailed) as raised:
        task_result(Outcome(RUN, "failed", 1, "ValueError", "x" * 5000))
    assert len(str(raised.value)) == MAX_SHOWN_CHARS and str(raised.value).endswith("…")


def test_a_run_held_at_its_projects_limit_is_a_retry_saying_why() -> None:
    reason = "project 'acme' has spent 1.00 USD of its 1.00 USD monthly limit"
    with pytest.raises(Retry) as raised:
        task_result(Outcome(RUN, "held", 0, "MonthlyLimitReached", reason, retry_in_s=30.0))
    assert str(raised.value.exc) == f"held: MonthlyLimitReached: {reason}"
    assert raised.value.when == 30.0 and raised.value.sig is None


def test_a_waiting_run_is_a_retry_with_its_wake_time() -> None:
    with pytest.raises(Retry) as raised:
        task_result(Outcome(RUN, "waiting", 1, "sleep", retry_in_s=600.0))
    assert raised.value.when == 600.0
    assert "waiting (sleep), wakes in 600.0s" in str(raised.value)
