"""Flow control with real worker processes on PostgreSQL + Redis: keyed concurrency holds
across processes (no two runs of a key overlap), and a slot held by a worker killed with -9 is
handed on once its lease expired."""

from __future__ import annotations

import itertools
import signal
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from domain.db.models import runs
from tests.e2e.stack import Stack, with_scheduler
from tests.polling import eventually
from tests.services import PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def stack(pg_url: str, redis_server: PrivateRedis, tmp_path: Path) -> Iterator[Stack]:
    with with_scheduler(pg_url, redis_server.url(13), tmp_path) as s:  # its reaper recovers
        yield s


def _finished(stack: Stack, ids: list[uuid.UUID]) -> list[tuple[str, str, object, object]]:
    with stack.client() as client, client.engine.connect() as conn:
        rows = conn.execute(
            select(
                runs.c.concurrency_key, runs.c.status, runs.c.started_at, runs.c.finished_at
            ).where(runs.c.id.in_(ids))
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_4_workers_with_4_slots_never_overlap_two_runs_of_a_key(stack: Stack) -> None:
    workers = [stack.worker("keyed", name=f"w{i}", concurrency=4) for i in range(4)]
    with stack.client() as client:
        made = client.enqueue_many(
            {"name": "one_per_key", "params": {"key": f"k{i % 5}"}, "queue": "keyed"}
            for i in range(200)
        )
        ids = [r.id for r in made]
        eventually(
            lambda: all(r[1] == "succeeded" for r in _finished(stack, ids)),
            timeout=180,
            what="all 200 keyed runs succeeded",
        )
    for proc in workers:
        stack.kill(proc, signal.SIGTERM)
    by_key: dict[str, list[tuple[object, object]]] = defaultdict(list)
    for key, _, started, finished in _finished(stack, ids):
        by_key[key].append((started, finished))
    assert sorted(by_key) == [f"k{i}" for i in range(5)]
    for key, spans in by_key.items():
        spans.sort()
        assert len(spans) == 40
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"two runs of {key} overlapped: {start} < {end}"


def test_a_slot_held_by_a_killed_worker_is_handed_on_after_its_lease_expired(
    stack: Stack, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    victim = stack.worker("keyed", name="victim", concurrency=2)
    with stack.client() as client:
        first = client.enqueue(
            "one_per_key", {"key": "repo", "seconds": 60, "marks": str(marks)}, queue="keyed"
        )
        eventually(lambda: marks.exists() and f"start {first.id}" in marks.read_text(), timeout=60)
        second = client.enqueue(
            "one_per_key", {"key": "repo", "seconds": 0.2, "marks": str(marks)}, queue="keyed"
        )
        eventually(lambda: client.get(second.id).status == "waiting", timeout=30)
        assert client.get(second.id).wait_reason == "concurrency:repo"
        stack.kill(victim, signal.SIGKILL)
        rescuer = stack.worker("keyed", name="rescuer", concurrency=2)
        try:
            final = client.wait(second.id, timeout=60)
        finally:
            stack.kill(rescuer, signal.SIGTERM)
        lost = client.get(first.id)
        assert (lost.status, lost.error_type) == ("failed", "WorkerLost")
        assert (final.status, final.attempt) == ("succeeded", 1)
        assert marks.read_text().splitlines() == [
            f"start {first.id}",
            f"start {second.id}",
            f"done {second.id}",
        ]
        assert lost.finished_at is not None and final.started_at is not None
        assert final.started_at >= lost.finished_at  # not before the reaper took the slot back
