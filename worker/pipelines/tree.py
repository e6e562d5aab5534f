"""The process tree of one pipeline run: who is in it, what it uses, signalling it, and
waiting for it to be gone."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import psutil


class ProcessTree:
    """The pipeline's processes: its session, plus every descendant ever seen."""

    def __init__(self, pid: int) -> None:
        self.sid = pid  # start_new_session: the child leads its own session and group
        self.main = psutil.Process(pid)
        self.known: dict[int, psutil.Process] = {pid: self.main}
        self.last_seen: list[psutil.Process] = [self.main]
        self._cpu_prev: tuple[float, float] | None = None

    def members(self) -> list[psutil.Process]:
        """The live processes of the tree (a walk of the whole process table: not cheap)."""
        try:
            for child in self.main.children(recursive=True):
                self.known.setdefault(child.pid, child)
        except psutil.Error:
            pass
        return self.alive_known()

    def alive_known(self) -> list[psutil.Process]:
        return [proc for proc in list(self.known.values()) if alive(proc)]

    def collect(self, *, walk: bool = True) -> list[psutil.Process]:
        """Everything to signal: the tree (`walk`: found afresh, else as last seen) and every
        process still in the session, even one whose parent already exited."""
        targets = {p.pid: p for p in (self.members() if walk else self.alive_known())}
        for pid in psutil.pids():
            if pid not in targets:
                try:
                    if os.getsid(pid) == self.sid:
                        targets[pid] = psutil.Process(pid)
                except (OSError, psutil.Error):
                    continue
        for proc in targets.values():
            self.known.setdefault(proc.pid, proc)
        return list(targets.values())

    def sample(self) -> tuple[Sample, float]:
        """(sample, cpu seconds used since the previous call)."""
        rss, cpu, count = 0, 0.0, 0
        self.last_seen = self.members()
        for proc in self.last_seen:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    cpu += times.user + times.system + times.children_user + times.children_system
                    count += 1
            except psutil.Error:
                continue
        now = time.monotonic()
        used, percent = 0.0, 0.0
        if self._cpu_prev is not None:
            used = max(0.0, cpu - self._cpu_prev[1])
            elapsed = now - self._cpu_prev[0]
            percent = used / elapsed * 100 if elapsed > 0 else 0.0
        self._cpu_prev = (now, cpu)
        return Sample(round(percent, 1), rss, count), used

    def signal(self, sig: int, targets: list[psutil.Process]) -> int:
        """Send `sig` to `targets` and the session's process group; how many were targeted.

        Callers gather targets once and reuse them: while a run is being stopped, walking the
        process table again would only delay the SIGKILL."""
        for proc in targets:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.sid, sig)
        return len(targets)

    def wait_gone(self, timeout: float) -> None:
        """Wait until every known process is dead (a zombie waiting for its new parent to reap
        it counts as dead: it runs nothing and holds no memory)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(alive(p) for p in self.known.values()):
                return
            time.sleep(0.01)


def alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@dataclass(frozen=True)
class Sample:
    cpu_percent: float
    rss_bytes: int
    processes: int
