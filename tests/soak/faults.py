"""The faults the soak injects, on a timeline that repeats every `CYCLE_S` seconds of load.

Each fault is one or two actions (a PostgreSQL outage is a stop, then a start six seconds
later); the soak's loop runs the actions that are due between its enqueue ticks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
from sqlalchemy import Engine, text

from scheduler.leader import ADVISORY_KEY, IDLE_TIMEOUT_S
from tests.e2e.stack import Stack
from tests.polling import eventually
from tests.services import PrivatePostgres, PrivateRedis

CYCLE_S = 90.0
#: A freeze shorter than the leader's idle session timeout keeps its lock; a longer one loses it.
BELOW_LOCK_S = IDLE_TIMEOUT_S - 4
BEYOND_LOCK_S = IDLE_TIMEOUT_S + 6
OUTAGE_S = 6.0


@dataclass
class Action:
    at: float  # seconds into the load
    fault: str | None  # the fault this action injects; None for the action that ends one
    run: Callable[[], None]


@dataclass
class Faults:
    """What the faults did, for the invariant checker and the summary."""

    stack: Stack
    postgres: PrivatePostgres
    redis: PrivateRedis
    engine: Engine
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    schedulers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed_groups: set[int] = field(default_factory=set)  # process groups of killed workers
    poisons: list[bytes] = field(default_factory=list)
    injected: list[str] = field(default_factory=list)
    postgres_down: bool = False
    frozen: subprocess.Popen[bytes] | None = None
    _started: int = 0

    def start_worker(self) -> subprocess.Popen[bytes]:
        self._started += 1
        proc = self.stack.worker("default", name=f"soak{self._started}", concurrency=2)
        self.workers.append(proc)
        return proc

    # -- the faults -------------------------------------------------------------------------
    def kill_worker(self) -> None:
        """kill -9 the oldest live worker (and its children), and start a new one."""
        victim = next(w for w in self.workers if w.poll() is None)
        self.killed_groups.add(victim.pid)
        self.stack.kill(victim, signal.SIGKILL)
        self.start_worker()

    def flushall(self) -> None:
        """FLUSHALL on the soak's own redis-server (started for it on a free port, see
        test_soak.py): no other test's data lives there."""
        self.stack.redis.flushall()

    def restart_redis(self) -> None:
        self.redis.restart()

    def stop_postgres(self) -> None:
        self.postgres_down = True
        self.postgres.stop()

    def start_postgres(self) -> None:
        self.postgres.start()
        self.postgres_down = False

    def poison(self) -> None:
        raw = f"soak poison {uuid.uuid4()}".encode()
        self.poisons.append(raw)
        self.stack.redis.lpush("celery", raw)

    def freeze_leader(self) -> None:
        eventually(lambda: self.leader() is not None, timeout=30)  # one may be taking over
        self.frozen = self.leader()
        assert self.frozen is not None
        os.killpg(self.frozen.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.frozen is not None:
            os.killpg(self.frozen.pid, signal.SIGCONT)
            self.frozen = None

    def leader(self) -> subprocess.Popen[bytes] | None:
        """The scheduler process whose database session holds the leader's advisory lock."""
        with self.engine.connect() as conn:
            port = conn.execute(
                text(
                    "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                    "WHERE l.locktype = 'advisory' AND l.granted "
                    "AND a.datname = current_database() "
                    "AND l.objid = (CAST(:k AS bigint) & 4294967295)"
                ),
                {"k": ADVISORY_KEY},
            ).scalar()
        for proc in self.schedulers:
            with contextlib.suppress(psutil.Error):
                ports = {c.laddr.port for c in psutil.Process(proc.pid).net_connections("tcp")}
                if port in ports:
                    return proc
        return None

    # -- the timeline -----------------------------------------------------------------------
    def timeline(self, seconds: float) -> list[Action]:
        """Every fault once per cycle, the cycles repeated while the load lasts."""
        cycle = [
            Action(6, "poison message", self.poison),
            Action(10, "kill -9 worker", self.kill_worker),
            Action(20, "redis FLUSHALL", self.flushall),
            Action(30, "redis restart", self.restart_redis),
            Action(40, "postgres immediate stop", self.stop_postgres),
            Action(42, "poison message", self.poison),
            Action(40 + OUTAGE_S, None, self.start_postgres),
            Action(56, "scheduler SIGSTOP below the lock timeout", self.freeze_leader),
            Action(56 + BELOW_LOCK_S, None, self.thaw),
            Action(68, "scheduler SIGSTOP beyond the lock timeout", self.freeze_leader),
            Action(76, "kill -9 worker", self.kill_worker),
            Action(68 + BEYOND_LOCK_S, None, self.thaw),
        ]
        actions = []
        start = 0.0
        while start + CYCLE_S <= max(seconds, CYCLE_S):
            actions += [Action(start + a.at, a.fault, a.run) for a in cycle]
            start += CYCLE_S
        return sorted(actions, key=lambda a: a.at)

    def close(self) -> None:
        """Every process the soak started is ended, frozen ones included, whatever happened."""
        for proc in self.stack.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
        try:
            self.stack.stop_all()
        finally:
            for proc in [*self.workers, *self.schedulers]:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
