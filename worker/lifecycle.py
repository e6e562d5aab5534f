"""A worker's life around its runs: the `workers` registry heartbeat, and graceful shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import psutil
import structlog
from sqlalchemy import Engine

from domain.clock import utc_now
from domain.costs import reservations
from domain.db import sql
from domain.db.models import workers
from domain.runs import recovery
from domain.tasks import catalog
from domain.tasks.catalog import REFRESH_EVERY_S
from domain.tasks.registry import TaskSpec

log = structlog.get_logger("conveyor.worker")

REGISTRY_INTERVAL_S = 5.0


class Registration:
    """Heartbeats this process into `workers` (hostname, pid, queues, runs in flight)."""

    def __init__(
        self,
        engine: Engine,
        owner: str,
        queues: list[str],
        running: Any,
        specs: Sequence[TaskSpec] = (),
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.queues = queues
        self.running = running  # callable: how many runs this process executes now
        self.specs = list(specs)  # refreshed in the catalog, so producers know they are served
        self._published_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="conveyor-registry", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                if time.monotonic() - self._published_at >= REFRESH_EVERY_S:
                    # Publishing again only writes what is missing or changed, and marks the
                    # rest as served: a catalog emptied by hand fills up again.
                    catalog.publish(self.engine, self.specs, owner=self.owner, now=utc_now())
                    self._published_at = time.monotonic()
            except Exception as exc:  # the registry is informational: never fatal
                log.warning("worker.registry_failed", reason=str(exc))
            self._stop.wait(REGISTRY_INTERVAL_S)

    def beat(self, *, stopped: bool = False) -> None:
        now = utc_now()
        values = {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "queues": {"names": self.queues},
            "heartbeat_at": now,
            "running": int(self.running()),
            "stopped": stopped,
        }
        with self.engine.begin() as conn:
            conn.execute(
                sql.insert(conn, workers)
                .values(id=self.owner, started_at=now, **values)
                .on_conflict_do_update(index_elements=["id"], set_=values)
            )

    def stop(self) -> None:
        self._stop.set()
        try:
            self.beat(stopped=True)
        except Exception as exc:
            log.warning("worker.registry_failed", reason=str(exc))


def graceful_stop(engine: Engine, grace_s: float) -> threading.Thread:
    """After SIGTERM: runs get `grace_s` to finish; then their code is ended (the pool's child
    processes are killed; a thread pool ends with this process) and their leases are given
    back in one UPDATE, so another worker starts them at once instead of after the lease."""

    def expire() -> None:
        time.sleep(grace_s)
        me = psutil.Process()
        children = me.children(recursive=True)
        host = socket.gethostname()
        owners = [f"{host}:{me.pid}"] + [f"{host}:{c.pid}" for c in children]
        for child in children:
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(children, timeout=5)
        with engine.begin() as conn:
            now = utc_now()
            released = recovery.release_owned(conn, owners, now=now)
            reservations.release_held(conn, released, now=now)
        log.warning(
            "worker.grace_expired",
            grace_s=grace_s,
            released=[str(r) for r in released],
            note="their runs were handed back for another worker",
        )
        # Nothing is left to wait for: Celery's warm shutdown would wait on the killed jobs (or
        # on task threads of a thread pool), so end the process, and any child the pool forked
        # in the meantime, here.
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGKILL)
        os._exit(0)

    thread = threading.Thread(target=expire, name="conveyor-grace", daemon=True)
    thread.start()
    return thread


__all__ = ["Registration", "graceful_stop", "workers"]
