"""One rooted exception tree; each class carries its default message in its docstring."""

from __future__ import annotations

import traceback


class ConveyorError(Exception):
    """Something went wrong in conveyor."""

    #: exit code the CLI uses for this error (2 = the caller's input, 1 = the system).
    exit_code = 1
    #: True when the message says all there is (a setup problem, not a bug): a run that fails
    #: with it stores the message alone, without the traceback of where it was noticed.
    self_explanatory = False

    def __init__(self, message: str | None = None, **context: object) -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        self.context = context

    @property
    def message(self) -> str:
        return str(self)


class InvalidInput(ConveyorError):
    """The input is not valid."""

    exit_code = 2

    def __init__(self, message: str | None = None, *, field: str | None = None, **context: object):
        super().__init__(message, field=field, **context)
        self.field = field


class ConfigurationError(InvalidInput):
    """conveyor's configuration is not valid."""


class NotFound(ConveyorError):
    """The requested object does not exist."""


class RunNotFound(NotFound):
    """No run has this id."""


class Conflict(ConveyorError):
    """The request conflicts with the current state."""


class InvalidTransition(Conflict):
    """The run is not in a state that allows this."""


class LeaseLost(Conflict):
    """This attempt no longer owns the run (another attempt claimed it, or it was finished)."""


class TransientError(ConveyorError):
    """A temporary failure; trying again later may succeed."""


class DatabaseUnavailable(TransientError):
    """The database cannot be reached."""


class SchemaNotReady(ConveyorError):
    """The database does not have the schema this code needs: run `conveyor migrate`."""


class BrokerUnavailable(TransientError):
    """The message broker cannot be reached."""


class PortInUse(ConveyorError):
    """A port this process must listen on is taken by another process."""


class WaitTimeout(ConveyorError):
    """The run did not finish in time."""


class NonDeterministicStep(ConveyorError):
    """The task reached its steps in another order than the run's recorded history."""


class ChildFailed(ConveyorError):
    """One or more child runs did not succeed."""


class UnknownTask(NotFound):
    """No task or pipeline is registered under this name."""

    exit_code = 2


class RunStopped(ConveyorError):
    """The run was told to stop."""


class RunCancelled(RunStopped):
    """The run was cancelled."""


class RunTimedOut(RunStopped):
    """The run took longer than its timeout."""


class BudgetExceeded(RunStopped):
    """The run went over its budget."""


def safe_str(exc: BaseException) -> str:
    """str(exc), even for exceptions whose __str__ itself raises."""
    try:
        return str(exc)
    except Exception:
        return "".join(traceback.format_exception_only(type(exc), None)).strip()
