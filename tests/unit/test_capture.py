"""print() and logging in a bound thread become run log lines; other threads are left alone."""

from __future__ import annotations

import io
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker import capture

RUN_A = uuid.UUID(int=1)
RUN_B = uuid.UUID(int=2)


@dataclass(frozen=True)
class Line:
    run_id: uuid.UUID
    attempt: int
    message: str
    stream: str
    level: str
    fields: dict[str, Any] | None


class FakeWriter:
    """Records lines like LogWriter.log; `fail=True` makes it raise like a writer that broke."""

    def __init__(self, *, fail: bool = False) -> None:
        self.lines: list[Line] = []
        self.fail = fail
        self._lock = threading.Lock()

    def log(
        self,
        run_id: uuid.UUID,
        attempt: int,
        message: str,
        *,
        stream: str = "log",
        level: str = "info",
        fields: dict[str, Any] | None = None,
    ) -> int:
        if self.fail:
            raise RuntimeError("writer is broken")
        with self._lock:
            self.lines.append(Line(run_id, attempt, message, stream, level, fields))
            return len(self.lines)

    def messages(self, stream: str | None = None) -> list[str]:
        return [line.message for line in self.lines if stream in (None, line.stream)]


@dataclass
class Streams:
    out: io.StringIO
    err: io.StringIO


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Streams]]:
    """Installs capture over fresh originals; call it in the test body, because pytest puts its
    own sys.stdout back between fixture setup and the test."""

    def _install() -> Streams:
        real = Streams(io.StringIO(), io.StringIO())
        monkeypatch.setattr(sys, "stdout", real.out)
        monkeypatch.setattr(sys, "stderr", real.err)
        capture.install()
        return real

    yield _install
    capture.unbind()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, capture._RunLogHandler)]:
        root.removeHandler(handler)


@pytest.fixture
def task_logger(monkeypatch: pytest.MonkeyPatch) -> logging.Logger:
    logger = logging.getLogger("tests.capture.task")
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    return logger


def in_thread(target: Any) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


def test_print_in_a_bound_thread_becomes_one_line_per_line(install: Callable[[], Streams]) -> None:
    streams = install()
    writer = FakeWriter()
    capture.bind(writer, RUN_A, 2)
    print("first")
    print("second\nthird")
    sys.stdout.write("par")
    sys.stdout.write("tial\r\n")
    print("to stderr", file=sys.stderr)
    capture.unbind()

    assert writer.messages("stdout") == ["first", "second", "third", "partial"]
    assert writer.messages("stderr") == ["to stderr"]
    assert {(line.run_id, line.attempt) for line in writer.lines} == {(RUN_A, 2)}
    assert streams.out.getvalue() == streams.err.getvalue() == ""


def test_an_unfinished_line_is_emitted_on_unbind(install: Callable[[], Streams]) -> None:
    streams = install()
    writer = FakeWriter()
    capture.bind(writer, RUN_A, 1)
    print("progress: 50%", end="")
    assert writer.lines == []
    capture.unbind()
    assert writer.messages("stdout") == ["progress: 50%"]
    print("after unbind")
    assert writer.messages() == ["progress: 50%"]
    assert streams.out.getvalue() == "after unbind\n"


def test_unbound_threads_write_to_the_real_stream(install: Callable[[], Streams]) -> None:
    streams = install()
    writer = FakeWriter()
    capture.bind(writer, RUN_A, 1)
    in_thread(lambda: print("from a worker thread"))
    print("from the task")
    capture.unbind()
    assert streams.out.getvalue() == "from a worker thread\n"
    assert writer.messages() == ["from the task"]


def test_log_records_carry_level_and_logger(
    install: Callable[[], Streams], task_logger: logging.Logger
) -> None:
    install()
    writer = FakeWriter()
    capture.bind(writer, RUN_A, 1)
    task_logger.info("fetched %d rows", 3)
    task_logger.warning("slow")
    capture.unbind()
    task_logger.error("unbound: ignored")
    assert [(line.message, line.stream, line.level, line.fields) for line in writer.lines] == [
        ("fetched 3 rows", "log", "info", {"logger": "tests.capture.task"}),
        ("slow", "log", "warning", {"logger": "tests.capture.task"}),
    ]


def test_exception_text_is_part_of_the_line(
    install: Callable[[], Streams], task_logger: logging.Logger
) -> None:
    install()
    writer = FakeWriter()
    capture.bind(writer, RUN_A, 1)
    try:
        raise ValueError("bad row 7")
    except ValueError:
        task_logger.exception("import failed")
    capture.unbind()
    [line] = writer.lines
    assert line.level == "error"
    assert line.message.startswith("import failed\nTraceback (most recent call last):")
    assert "ValueError: bad row 7" in line.message


def test_two_threads_bound_to_two_runs_do_not_mix(
    install: Callable[[], Streams], task_logger: logging.Logger
) -> None:
    streams = install()
    writer = FakeWriter()
    barrier = threading.Barrier(2)

    def task(run_id: uuid.UUID, name: str) -> None:
        capture.bind(writer, run_id, 1)
        barrier.wait()
        for i in range(50):
            print(f"{name} {i}", end="\n" if i % 2 else "")
            task_logger.warning("%s log %d", name, i)
        capture.unbind()

    threads = [
        threading.Thread(target=task, args=(RUN_A, "a")),
        threading.Thread(target=task, args=(RUN_B, "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    for run_id, name in ((RUN_A, "a"), (RUN_B, "b")):
        mine = [line for line in writer.lines if line.run_id == run_id]
        assert all(line.message.startswith(name) for line in mine)
        assert len([line for line in mine if line.stream == "stdout"]) == 25
        assert len([line for line in mine if line.stream == "log"]) == 50
    assert streams.out.getvalue() == ""


def test_a_failing_writer_falls_back_to_the_real_streams(
    install: Callable[[], Streams], task_logger: logging.Logger
) -> None:
    streams = install()
    capture.bind(FakeWriter(fail=True), RUN_A, 1)
    print("still visible")
    task_logger.warning("also visible")
    print("tail", end="")
    capture.unbind()
    assert streams.out.getvalue() == "still visible\ntail\n"
    assert streams.err.getvalue() == "also visible\n"


def test_output_made_inside_the_writer_does_not_recurse(
    install: Callable[[], Streams], task_logger: logging.Logger
) -> None:
    streams = install()

    class NoisyWriter(FakeWriter):
        def log(self, run_id: uuid.UUID, attempt: int, message: str, **kw: Any) -> int:
            print(f"writer saw {message!r}")
            task_logger.warning("writer logged")
            return super().log(run_id, attempt, message, **kw)

    writer = NoisyWriter()
    capture.bind(writer, RUN_A, 1)
    print("hello")
    capture.unbind()
    assert writer.messages() == ["hello"]
    assert streams.out.getvalue() == "writer saw 'hello'\n"


def test_conveyor_own_loggers_stay_out_of_run_logs(install: Callable[[], Streams]) -> None:
    install()
    writer = FakeWriter()
    capture.bind(writer, RUN_A, 1)
    logging.getLogger("conveyor.worker").error("run.claimed")
    capture.unbind()
    assert writer.lines == []


def test_install_is_idempotent(install: Callable[[], Streams]) -> None:
    streams = install()
    proxy = sys.stdout
    capture.install()
    assert sys.stdout is proxy
    assert getattr(sys.stderr, "original", None) is streams.err  # not a proxy of a proxy
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, capture._RunLogHandler)]
    assert len(handlers) == 1


def test_bind_puts_back_a_proxy_that_was_swapped_out(
    install: Callable[[], Streams], monkeypatch: pytest.MonkeyPatch
) -> None:
    install()
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", swapped)  # as Celery's redirect or pytest's capture do
    writer = FakeWriter()
    capture.bind(writer, RUN_A, 1)
    print("captured anyway")
    capture.unbind()
    print("unbound")
    assert writer.messages() == ["captured anyway"]
    assert swapped.getvalue() == "unbound\n"


def test_proxies_delegate_the_stream_api(
    install: Callable[[], Streams], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with (tmp_path / "out.txt").open("w", encoding="utf-8") as real:
        install()
        monkeypatch.setattr(sys, "stdout", real)
        capture.install()  # wraps the new sys.stdout
        assert sys.stdout is not real
        assert sys.stdout.fileno() == real.fileno()
        assert sys.stdout.isatty() is False
        assert sys.stdout.encoding == "utf-8"
        assert sys.stdout.errors == real.errors
        print("unbound", flush=True)
        assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "unbound\n"
