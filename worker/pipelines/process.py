"""One pipeline process: started in its own session, watched, streamed, and always reaped.

A single loop selects on stdout, stderr, stdin (the params) and a pidfd for the exit, so there
is no thread to coordinate and no poll interval on the way out. Around it:

- every line (cut at MAX_LINE_BYTES, undecodable bytes replaced) goes to `on_line`;
- CPU % and RSS of the whole process tree are sampled every `sample_every_s` into `on_sample`;
- `mem_hard` is a watchdog on the tree's RSS (SIGKILL when crossed, like an OOM kill);
  `cpu_hard` throttles the tree with SIGSTOP/SIGCONT to that many cores; soft limits report;
- a stop (cancel, timeout) sends SIGTERM to the session, then SIGKILL after the grace period;
- when main.py exits, whatever it left behind is killed (as when a container's init exits).

Processes are found by session id as well as by parentage, so a child that ignores SIGTERM,
or one whose parent already exited, is still killed.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from worker.pipelines.lines import LineSplitter
from worker.pipelines.tree import ProcessTree, Sample

READ_CHUNK = 256 * 1024
STDERR_TAIL = 20

LineFn = Callable[[str, str], None]  # (stream, text)


@dataclass(frozen=True)
class Limits:
    cpu_hard: float | None = None
    mem_hard: int | None = None
    cpu_soft: float | None = None
    mem_soft: int | None = None


@dataclass
class ProcessOutcome:
    returncode: int
    killed_for: str | None  # "stop", "memory" or None
    peak_rss: int = 0
    throttled_s: float = 0.0
    stderr_tail: list[str] = field(default_factory=list)
    leftovers_killed: int = 0

    @property
    def exit_code(self) -> int:
        """Shell convention: 128 + signal number when a signal ended it (137 = SIGKILL)."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode


class PipelineProcess:
    """Runs one command to the end; see the module docstring for what happens meanwhile."""

    def __init__(
        self,
        argv: list[str],
        *,
        cwd: str,
        env: dict[str, str],
        stdin: bytes,
        on_line: LineFn,
        should_stop: Callable[[], bool],
        limits: Limits = Limits(),
        on_sample: Callable[[Sample], None] = lambda s: None,
        on_soft_limit: Callable[[str, float, float], None] = lambda r, v, lim: None,
        term_grace_s: float = 2.0,
        sample_every_s: float = 1.0,
        drain_s: float = 2.0,
    ) -> None:
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.stdin = stdin
        self.on_line = on_line
        self.should_stop = should_stop
        self.limits = limits
        self.on_sample = on_sample
        self.on_soft_limit = on_soft_limit
        self.term_grace_s = term_grace_s
        self.sample_every_s = sample_every_s
        self.drain_s = drain_s
        cores = os.cpu_count() or 1
        self.throttle = limits.cpu_hard is not None and limits.cpu_hard < cores
        fast = self.throttle or limits.mem_hard is not None
        self.watch_every_s = 0.1 if self.throttle else (0.25 if fast else sample_every_s)

    def run(self) -> ProcessOutcome:
        proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        try:
            return self._supervise(proc)
        finally:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            if proc.returncode is None:  # only on an error in this loop: never leave it behind
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def _supervise(self, proc: subprocess.Popen[bytes]) -> ProcessOutcome:
        try:
            tree = ProcessTree(proc.pid)
        except psutil.NoSuchProcess:
            proc.wait()
            return ProcessOutcome(proc.returncode, None)
        return _Supervision(self, proc, tree).run()


class _Supervision:
    """The state of one supervised process: the select loop and what it decides each turn."""

    def __init__(
        self, spec: PipelineProcess, proc: subprocess.Popen[bytes], tree: ProcessTree
    ) -> None:
        assert proc.stdin and proc.stdout and proc.stderr
        self.spec, self.proc, self.tree = spec, proc, tree
        self.sel = selectors.DefaultSelector()
        self.splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
        for stream, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            os.set_blocking(pipe.fileno(), False)
            self.sel.register(pipe.fileno(), selectors.EVENT_READ, stream)
        self.open_streams = 2
        self.pending = memoryview(spec.stdin)
        if self.pending:
            os.set_blocking(proc.stdin.fileno(), False)
            self.sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
        else:
            proc.stdin.close()
        self.pidfd = _pidfd(proc.pid)
        if self.pidfd is not None:
            self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.outcome = ProcessOutcome(0, None)
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL)
        now = time.monotonic()
        self.next_watch = now + min(spec.watch_every_s, 0.1)
        self.next_sample = now + spec.sample_every_s
        self.kill_at: float | None = None
        self.resume_at: float | None = None
        self.exited_at: float | None = None
        self.soft_seen: set[str] = set()
        self.doomed: list[psutil.Process] = []

    def run(self) -> ProcessOutcome:
        try:
            while not self._done():
                self._pump()
                running = self.proc.poll() is None
                now = time.monotonic()
                self._control(now, running)
                if running and now >= self.next_watch and self.outcome.killed_for is None:
                    self._watch(now)
                if not running and self.exited_at is None:
                    self.exited_at = now
                    # main.py is done: anything it left behind goes, as with a container.
                    leftovers = self.tree.collect(walk=False)
                    self.outcome.leftovers_killed = self.tree.signal(signal.SIGKILL, leftovers)
                    self.kill_at = self.resume_at = None
        finally:
            self.sel.close()
            if self.pidfd is not None:
                os.close(self.pidfd)
        self.tree.wait_gone(timeout=1.0)
        code = self.proc.returncode
        self.outcome.returncode = code if code is not None else self.proc.wait()
        self.outcome.stderr_tail = list(self.tail)
        return self.outcome

    def _done(self) -> bool:
        if self.exited_at is None:
            return False
        return self.open_streams == 0 or time.monotonic() > self.exited_at + self.spec.drain_s

    def _pump(self) -> None:
        """Wait for output, the exit or the next deadline; hand complete lines on."""
        now = time.monotonic()
        wake = [self.next_watch, self.next_sample, now + 0.1]
        wake += [t for t in (self.kill_at, self.resume_at) if t is not None]
        if self.pidfd is None and self.exited_at is None:
            wake.append(now + 0.02)
        for key, _ in self.sel.select(max(0.0, min(wake) - now)):
            tag = key.data
            if tag == "exit":
                self.sel.unregister(key.fd)
            elif tag == "stdin":
                self._write_stdin(key.fd)
            else:
                self._read(key.fd, tag)

    def _read(self, fd: int, stream: str) -> None:
        data = _read(fd)
        if data is None:
            return
        splitter = self.splitters[stream]
        lines = splitter.feed(data) if data else splitter.close()
        if not data:
            self.sel.unregister(fd)
            self.open_streams -= 1
        for line in lines:
            if stream == "stderr":
                self.tail.append(line)
            self.spec.on_line(stream, line)

    def _write_stdin(self, fd: int) -> None:
        try:
            written = os.write(fd, self.pending[:READ_CHUNK])
            self.pending = self.pending[written:]
        except BlockingIOError:
            return
        except OSError:  # the pipeline closed stdin or exited: it did not want the params
            self.pending = self.pending[:0]
        if not self.pending:
            self.sel.unregister(fd)
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def _control(self, now: float, running: bool) -> None:
        """Stop requests, the SIGKILL after the grace period, the end of a throttling pause."""
        if running and self.outcome.killed_for is None and self.spec.should_stop():
            self.outcome.killed_for = "stop"
            self.doomed = self.tree.collect()
            self.tree.signal(signal.SIGTERM, self.doomed)
            self.tree.signal(signal.SIGCONT, self.doomed)  # a throttled tree must see the TERM
            self.resume_at = None
            self.kill_at = now + self.spec.term_grace_s
        if self.kill_at is not None and now >= self.kill_at:
            self.tree.signal(signal.SIGKILL, self.doomed)
            self.kill_at = None
        if self.resume_at is not None and now >= self.resume_at:
            self.tree.signal(signal.SIGCONT, self.tree.last_seen)
            self.resume_at = None

    def _watch(self, now: float) -> None:
        """Sample the tree: metrics, soft limits, the memory watchdog, CPU throttling."""
        spec, limits = self.spec, self.spec.limits
        self.next_watch = now + spec.watch_every_s
        sample, used = self.tree.sample()
        self.outcome.peak_rss = max(self.outcome.peak_rss, sample.rss_bytes)
        if now >= self.next_sample:
            self.next_sample = now + spec.sample_every_s
            spec.on_sample(sample)
        checks = (
            ("memory", float(sample.rss_bytes), limits.mem_soft),
            ("cpu", sample.cpu_percent / 100, limits.cpu_soft),
        )
        for resource, value, limit in checks:
            if limit is not None and value > limit and resource not in self.soft_seen:
                self.soft_seen.add(resource)
                spec.on_soft_limit(resource, value, float(limit))
        if limits.mem_hard and sample.rss_bytes > limits.mem_hard:
            self.outcome.killed_for = "memory"
            self.tree.signal(signal.SIGKILL, self.tree.collect(walk=False))
        elif spec.throttle and self.resume_at is None and self.kill_at is None:
            assert limits.cpu_hard is not None
            allowed = limits.cpu_hard * spec.watch_every_s
            if used > allowed:  # pause long enough to average at most cpu_hard cores
                pause = (used - allowed) / limits.cpu_hard
                self.tree.signal(signal.SIGSTOP, self.tree.last_seen)
                self.outcome.throttled_s += pause
                self.resume_at = now + pause


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _read(fd: int) -> bytes | None:
    """Bytes from `fd` (b"" at EOF), or None when nothing is there after all."""
    try:
        return os.read(fd, READ_CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""
