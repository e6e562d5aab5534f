"""Fair share between projects with real workers: project A has 5,000 runs queued on one
queue, project B enqueues 10 later; B's 10 start before A's next 200 (Celery's FIFO queue alone
would start them after all of A's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from domain.clock import utc_now
from domain.costs import projects
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from tests.e2e.stack import Stack, with_scheduler
from tests.polling import eventually
from tests.services import PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def stack(pg_url: str, redis_server: PrivateRedis, tmp_path: Path) -> Iterator[Stack]:
    with with_scheduler(pg_url, redis_server.url(15), tmp_path) as s:
        yield s


def test_a_late_project_starts_before_the_next_200_of_a_backlog(stack: Stack) -> None:
    with stack.client() as client:
        for name in ("a", "b"):
            projects.add_project(UnitOfWork(client.engine), name, now=utc_now())
        a = client.enqueue_many(
            {"name": "fair_job", "params": {"i": i}, "project": "a", "queue": "fair"}
            for i in range(5000)
        )
        with client.engine.connect() as conn:
            published = conn.execute(
                select(func.count()).where(runs.c.dispatched_at.is_not(None))
            ).scalar_one()
        assert published == stack.settings.dispatch_in_flight  # the rest wait for turns
        for i in range(2):
            stack.worker("fair", name=f"w{i}", concurrency=2)

        def started_a() -> int:
            with client.engine.connect() as conn:
                return int(
                    conn.execute(
                        select(func.count()).where(
                            runs.c.project == "a", runs.c.started_at.is_not(None)
                        )
                    ).scalar_one()
                )

        eventually(lambda: started_a() >= 300, timeout=120, what="A's backlog is moving")
        b = client.enqueue_many(
            {"name": "fair_job", "params": {"i": i}, "project": "b", "queue": "fair"}
            for i in range(10)
        )
        b_ids = [r.id for r in b]
        for run_id in b_ids:
            assert client.wait(run_id, timeout=120).status == "succeeded"
        with client.engine.connect() as conn:
            b_first = conn.execute(
                select(func.min(runs.c.created_at)).where(runs.c.id.in_(b_ids))
            ).scalar_one()
            b_last = conn.execute(
                select(func.max(runs.c.started_at)).where(runs.c.id.in_(b_ids))
            ).scalar_one()
            a_between = conn.execute(
                select(func.count()).where(
                    runs.c.project == "a",
                    runs.c.started_at > b_first,
                    runs.c.started_at <= b_last,
                )
            ).scalar_one()
            a_left = conn.execute(
                select(func.count()).where(runs.c.project == "a", runs.c.started_at.is_(None))
            ).scalar_one()
    assert len(a) == 5000 and a_left > 1000  # A still had a backlog when B was done
    assert a_between < 200, f"{a_between} of A's runs started between B's enqueue and B's last"
