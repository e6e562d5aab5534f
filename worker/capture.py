"""Route print() and stdlib logging inside a task into its run's logs, thread by thread.

`install()` puts proxies on sys.stdout/sys.stderr and a handler on the root logger, once per
process. They do nothing for a thread until `bind()` ties it to a run; an unbound thread (the
worker itself, the log writer's flusher, other libraries' threads) writes as if they were absent.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Protocol, TextIO, cast
from uuid import UUID

#: A line with no newline in sight is emitted once this long, so a progress bar drawn with "\r"
#: cannot grow one thread's buffer without bound (the writer cuts messages at 64 KiB anyway).
MAX_PARTIAL_CHARS = 64 * 1024

#: Loggers whose records stay out of run logs: conveyor's own (claims, the writer's failures)
#: describe the worker, not the task, and would otherwise recurse into the writer they report on.
OWN_LOGGER = "conveyor"


class LineSink(Protocol):
    """What a bound thread writes to: `worker.logwriter.LogWriter` in the worker."""

    def log(
        self,
        run_id: UUID,
        attempt: int,
        message: str,
        *,
        stream: str = ...,
        level: str = ...,
        fields: dict[str, Any] | None = ...,
    ) -> int: ...


class _Binding:
    __slots__ = ("attempt", "busy", "partial", "run_id", "writer")

    def __init__(self, writer: LineSink, run_id: UUID, attempt: int) -> None:
        self.writer = writer
        self.run_id = run_id
        self.attempt = attempt
        self.partial: dict[str, str] = {}
        # Set while this thread is inside the writer: anything it prints or logs meanwhile goes
        # to the real stream instead of back into the writer.
        self.busy = False


_local = threading.local()
_install_lock = threading.Lock()


def _binding() -> _Binding | None:
    return cast("_Binding | None", getattr(_local, "binding", None))


def install() -> None:
    """Put the proxies and the root handler in place; safe to call again (re-adds what is gone)."""
    with _install_lock:
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if current is not None and not isinstance(current, _StreamProxy):
                setattr(sys, name, _StreamProxy(current, name))
        root = logging.getLogger()
        if not any(isinstance(h, _RunLogHandler) for h in root.handlers):
            root.addHandler(_RunLogHandler())


def bind(writer: LineSink, run_id: UUID, attempt: int) -> None:
    """Send the current thread's prints and log records to `run_id` until `unbind()`.

    Also re-installs whatever was swapped out since `install()`: Celery's stdout redirection,
    pytest's capture and `contextlib.redirect_stdout` all replace sys.stdout wholesale.
    """
    install()
    unbind()
    _local.binding = _Binding(writer, run_id, attempt)


def unbind() -> None:
    """Emit the thread's unfinished lines and stop capturing it."""
    binding = _binding()
    if binding is None:
        return
    for stream, rest in binding.partial.items():
        if rest:
            _emit(binding, stream, rest, _original(stream))
    _local.binding = None


def _original(stream: str) -> TextIO:
    current = getattr(sys, stream)
    if isinstance(current, _StreamProxy):
        return current.original
    return cast(TextIO, current or getattr(sys, f"__{stream}__"))


def _emit(binding: _Binding, stream: str, line: str, fallback: TextIO) -> None:
    binding.busy = True
    try:
        binding.writer.log(binding.run_id, binding.attempt, line, stream=stream)
    except Exception:
        # The writer failed (or is shutting down): the line still reaches the worker's output.
        fallback.write(line + "\n")
    finally:
        binding.busy = False


class _StreamProxy:
    """Stands in for sys.stdout or sys.stderr; everything but `write` is the original's."""

    def __init__(self, original: TextIO, stream: str) -> None:
        self.original = original
        self.stream = stream

    def write(self, text: str) -> int:
        binding = _binding()
        if binding is None or binding.busy:
            return self.original.write(text)
        buffered = binding.partial.get(self.stream, "") + text
        if "\n" not in text and len(buffered) <= MAX_PARTIAL_CHARS:
            binding.partial[self.stream] = buffered
            return len(text)
        *lines, rest = buffered.split("\n")
        if len(rest) > MAX_PARTIAL_CHARS:
            lines.append(rest)
            rest = ""
        binding.partial[self.stream] = rest
        for line in lines:
            _emit(binding, self.stream, line.removesuffix("\r"), self.original)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.original.flush()

    def isatty(self) -> bool:
        return self.original.isatty()

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def encoding(self) -> str:
        return self.original.encoding

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not defined above (errors, buffer, closed, ...); the guard
        # keeps a half-built proxy (copy, pickle) from recursing while looking for `original`.
        if name == "original":
            raise AttributeError(name)
        return getattr(self.original, name)


class _RunLogHandler(logging.Handler):
    """Turns a bound thread's log records into run log lines; ignores every other thread."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))  # adds exc_info and stack text

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: the writer is thread-safe, and a thread blocked in the writer by
        # back-pressure must not hold a lock the flusher needs if the flusher logs something.
        binding = _binding()
        if binding is None or binding.busy or not self.filter(record):
            return False
        if record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + "."):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        binding = _binding()
        if binding is None:
            return
        binding.busy = True
        try:
            message = self.format(record)
        except Exception:
            binding.busy = False
            self.handleError(record)
            return
        try:
            binding.writer.log(
                binding.run_id,
                binding.attempt,
                message,
                stream="log",
                level=record.levelname.lower()[:10],  # run_logs.level is VARCHAR(10)
                fields={"logger": record.name},
            )
        except Exception:
            _original("stderr").write(message + "\n")
        finally:
            binding.busy = False
