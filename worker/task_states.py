"""The Celery task state of a delivery, told from what the executor did with its run.

Flower and `celery events` build a task's state from the worker's task events, and the worker
sends them from how the task body ended (celery/worker/request.py): a return is task-succeeded,
an exception task-failed, celery's `Retry` exception task-retried, `Ignore` no event at all.
So the body ends the way its run did:

- succeeded: it returns the status (SUCCESS);
- failed, timed_out, budget_exceeded, cancelled: it raises `RunFailed` with the error type and
  the first line of the error as recorded (masked) (FAILURE). The task lists it in `throws`, so
  Celery logs it as an expected outcome, one INFO line with no traceback;
- retrying: it raises `Retry` *itself*, never through `Task.retry`, which would publish a
  second message: conveyor's next attempt is already scheduled in the database (RETRY);
- held (its project is at a monthly limit and holds runs): `Retry` too, with the reason and
  when the run is checked again (it is still pending);
- dropped (a duplicate delivery), lease_lost, finish_failed: this delivery says nothing about
  the run, whose state another delivery tells, so it raises `Ignore` (no event).

Messages are acked on receipt (acks_late off), so none of this touches acks or leases.
"""

from __future__ import annotations

from celery.exceptions import Ignore, Retry

from worker.outcomes import Outcome

#: Long enough for an error's first line; Flower keeps every task's exception text.
MAX_SHOWN_CHARS = 500
NOT_TOLD = frozenset({"dropped", "lease_lost", "finish_failed"})


class RunFailed(Exception):
    """The run ended without succeeding (its error type and message follow)."""


def task_result(outcome: Outcome) -> str:
    """`outcome.status` for a run that succeeded; otherwise raises what the Celery task ends
    with (RunFailed, Retry or Ignore, see the module's docstring)."""
    if outcome.status == "succeeded":
        return outcome.status
    if outcome.status in NOT_TOLD:
        raise Ignore(outcome.status)
    error = RunFailed(_shown(outcome))
    if outcome.status == "retrying":
        delay = round(outcome.retry_in_s or 0.0, 1)
        raise Retry(f"attempt {outcome.attempt} failed, next in {delay}s", exc=error, when=delay)
    if outcome.status == "waiting":
        delay = round(outcome.retry_in_s or 0.0, 1)
        raise Retry(f"waiting ({outcome.error_type}), wakes in {delay}s", when=delay)
    if outcome.status == "held":
        delay = round(outcome.retry_in_s or 0.0, 1)
        raise Retry(f"held at a limit, checked again in {delay}s", exc=error, when=delay)
    raise error


def _shown(outcome: Outcome) -> str:
    first_line = (outcome.error or "").strip().split("\n", 1)[0]
    text = f"{outcome.status}: {outcome.error_type or 'error'}: {first_line}".rstrip(": ")
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 1] + "…"
