"""Real workers and a real scheduler on PostgreSQL + Redis, trying to break guarantees 1-3."""

from __future__ import annotations

import ast
import base64
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import func, select

from conveyor import Client
from domain.clock import utc_now
from domain.costs.ledger import usage
from domain.costs.projects import add_project
from domain.db.models import dead_letters, run_logs, run_steps, runs
from domain.db.unit_of_work import UnitOfWork
from domain.ports import Dispatch
from tests.e2e.stack import Stack
from tests.polling import eventually
from tests.services import PrivateRedis
from worker.app import create_app
from worker.publisher import CeleryPublisher

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(
    pg_database: str, redis_server: PrivateRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Two worker processes on the common queues and one scheduler, for the whole module."""
    s = Stack(
        pg_database,
        tmp_path_factory.mktemp("logs"),
        redis_server.url(13),
        CONVEYOR_BROKER_VISIBILITY_TIMEOUT_S="1",
    )
    s.redis.flushdb()
    s.scheduler()
    s.worker("default,slow", name="main")
    yield s
    s.stop_all()


@pytest.fixture
def client(stack: Stack, pg_url: str) -> Iterator[Client]:
    """A clean database for each test (pg_url truncates), the stack already running."""
    with stack.client() as c:
        yield c


def statuses(client: Client, ids: list[uuid.UUID]) -> dict[str, int]:
    with client.engine.connect() as conn:
        rows = conn.execute(
            select(runs.c.status, func.count()).where(runs.c.id.in_(ids)).group_by(runs.c.status)
        ).all()
    return {r[0]: r[1] for r in rows}


def marks(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_500_runs_all_succeed_with_logs_and_steps(client: Client) -> None:
    ids = [
        r.id for r in client.enqueue_many({"name": "noop", "params": {"i": i}} for i in range(500))
    ]
    eventually(lambda: statuses(client, ids) == {"succeeded": 500}, timeout=120)
    with client.engine.connect() as conn:
        lines = conn.execute(select(func.count()).select_from(run_logs)).scalar_one()
        steps = conn.execute(
            select(func.count()).select_from(run_steps).where(run_steps.c.status == "completed")
        ).scalar_one()
        results = conn.execute(select(runs.c.result).where(runs.c.id.in_(ids[:5]))).scalars().all()
    assert (lines, steps) == (500, 500)
    assert sorted(r["i"] for r in results) == [0, 1, 2, 3, 4]
    assert client.logs(ids[0])[0].message == "noop ran"


def test_a_prefork_child_freezes_its_startup_heap(client: Client) -> None:
    """Celery, SQLAlchemy and the task modules are out of the collector's reach, so a task's
    allocations do not make it walk them again and again."""
    run = client.enqueue("heap_frozen", {})
    done = client.wait(run.id, timeout=60)
    assert done.status == "succeeded"
    assert done.result > 50_000


def test_kill_9_mid_run_finishes_on_another_worker(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    marks_file = tmp_path / "marks"
    victim = stack.worker("fragile", name="victim")
    run = client.enqueue("side_effect", {"marks": str(marks_file), "seconds": 4}, queue="fragile")
    eventually(lambda: marks(marks_file) == ["start 1"], timeout=60)
    stack.kill(victim, signal.SIGKILL)  # the worker and its children, mid-run
    rescuer = stack.worker("fragile", name="rescuer")
    try:
        final = client.wait(run.id, timeout=60)
    finally:
        stack.kill(rescuer, signal.SIGTERM)
    assert (final.status, final.attempt) == ("succeeded", 2)
    assert marks(marks_file) == ["start 1", "start 2", "done 2"]  # the effect completed once


def test_kill_9_inside_a_reservation_gives_its_headroom_back(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    """A worker killed inside ctx.reserve() never releases it; the reaper does when it takes
    the run back, else the held headroom would count against the project's month for good
    (here the next attempt could not reserve again, and ended budget_exceeded)."""
    add_project(UnitOfWork(client.engine), "capped", monthly_cost_usd="1.00", now=utc_now())
    marks_file = tmp_path / "marks"
    victim = stack.worker("fragile", name="victim")
    params = {"marks": str(marks_file), "usd": "0.60", "seconds": 4}
    run = client.enqueue("reserves", params, queue="fragile", project="capped")
    eventually(lambda: marks(marks_file) == ["start 1"], timeout=60)
    stack.kill(victim, signal.SIGKILL)  # 0.60 USD held by an attempt that is gone
    rescuer = stack.worker("fragile", name="rescuer")
    try:
        final = client.wait(run.id, timeout=60)
    finally:
        stack.kill(rescuer, signal.SIGTERM)
    assert (final.status, final.attempt, final.error) == ("succeeded", 2, None)
    with client.engine.connect() as conn:
        month = conn.execute(
            select(usage.c.cost_usd, usage.c.reserved_usd).where(usage.c.project == "capped")
        ).one()
    assert (month.cost_usd, month.reserved_usd) == (Decimal("0.60"), Decimal(0))


def queued(stack: Stack, queue: str) -> int:
    """Messages waiting in a queue's Redis lists (one per priority level)."""
    lists = [queue, *(f"{queue}:{p}" for p in range(10))]
    return sum(int(stack.redis.llen(name)) for name in lists)


def test_kill_9_loses_no_run_the_worker_held_in_reserve(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    """A worker's prefetched run messages live only in its memory (worker/redis_transport.py
    keeps no copy in Redis): after a kill -9 the relay publishes them again, and each runs once."""
    busy_marks, held_marks = tmp_path / "busy", tmp_path / "held"
    victim = stack.worker("fragile", name="victim", concurrency=1)
    # Consuming before the two runs are sent, so both are taken within the relay's 2 s grace.
    ready = client.enqueue("noop", {"i": 0}, queue="fragile")
    assert client.wait(ready.id, timeout=60).status == "succeeded"
    # Sent together: the victim starts `busy` and prefetches `held` within milliseconds.
    busy, held = client.enqueue_many(
        {"name": "side_effect", "params": {"marks": str(path), "seconds": s}, "queue": "fragile"}
        for path, s in [(busy_marks, 6), (held_marks, 0)]
    )
    eventually(lambda: marks(busy_marks) == ["start 1"], timeout=60)
    eventually(lambda: queued(stack, "fragile") == 0, timeout=10)  # the victim holds `held`
    stack.kill(victim, signal.SIGKILL)
    assert marks(held_marks) == []
    rescuer = stack.worker("fragile", name="rescuer")
    try:
        held_final = client.wait(held.id, timeout=60)
        busy_final = client.wait(busy.id, timeout=60)
    finally:
        stack.kill(rescuer, signal.SIGTERM)
    assert (held_final.status, held_final.attempt) == ("succeeded", 1)
    assert marks(held_marks) == ["start 1", "done 1"]
    assert (busy_final.status, busy_final.attempt) == ("succeeded", 2)


def test_flushing_redis_loses_no_run(stack: Stack, client: Client) -> None:
    ids = [
        r.id
        for r in client.enqueue_many(
            {"name": "noop", "params": {"i": i}, "queue": "later"} for i in range(50)
        )
    ]
    assert stack.redis.llen("later") + sum(stack.redis.llen(f"later:{p}") for p in range(10)) == 50
    stack.redis.flushall()  # every message is gone; the database still has every run
    consumer = stack.worker("later", name="later")
    try:
        eventually(lambda: statuses(client, ids) == {"succeeded": 50}, timeout=90)
    finally:
        stack.kill(consumer, signal.SIGTERM)


def test_the_same_message_twice_executes_once(stack: Stack, client: Client, tmp_path: Path) -> None:
    marks_file = tmp_path / "marks"
    with Client(stack.settings, publisher=_NoPublish()) as quiet:
        run = quiet.enqueue("side_effect", {"marks": str(marks_file), "seconds": 0.5})
    publisher = CeleryPublisher(create_app(stack.settings))
    publisher.publish([Dispatch(run.id, run.name, run.queue, run.priority)] * 2)
    assert client.wait(run.id, timeout=30).status == "succeeded"
    eventually(lambda: marks(marks_file) == ["start 1", "done 1"], timeout=5)


def test_a_run_longer_than_the_visibility_timeout_runs_once(client: Client, tmp_path: Path) -> None:
    """The stack's Redis visibility timeout is 1 s; this run takes 4 s."""
    marks_file = tmp_path / "marks"
    run = client.enqueue("side_effect", {"marks": str(marks_file), "seconds": 4}, queue="slow")
    assert client.wait(run.id, timeout=60).status == "succeeded"
    assert marks(marks_file) == ["start 1", "done 1"]


def test_cancel_running_and_pending(client: Client) -> None:
    running = client.enqueue("waits", {"seconds": 60})
    eventually(lambda: client.get(running.id).status == "running", timeout=30)
    client.cancel(running.id)
    assert client.wait(running.id, timeout=15).status == "cancelled"
    pending = client.enqueue("waits", {"seconds": 60}, delay="1h")
    assert client.cancel(pending.id).status == "cancelled"


def test_timeout_kills_a_stuck_task_and_the_worker_goes_on(client: Client) -> None:
    run = client.enqueue("stuck")
    final = client.wait(run.id, timeout=30)
    assert (final.status, final.error_type) == ("timed_out", "RunTimedOut")
    assert client.wait(client.enqueue("noop").id, timeout=30).status == "succeeded"


def test_retries_with_backoff_then_fail(client: Client) -> None:
    run = client.enqueue("always_fails")
    final = client.wait(run.id, timeout=60)
    assert (final.status, final.attempt, final.error_type) == ("failed", 3, "ValueError")
    assert "failure on attempt 3" in (final.error or "")


def test_unpicklable_exception_and_non_json_result(client: Client) -> None:
    a = client.wait(client.enqueue("raises_unpicklable").id, timeout=30)
    assert (a.status, a.error_type) == ("failed", "Unpicklable")
    assert "carries a lock" in (a.error or "")
    b = client.wait(client.enqueue("returns_object").id, timeout=30)
    assert (b.status, b.error_type) == ("failed", "ResultNotSerializable")
    assert client.wait(client.enqueue("noop").id, timeout=30).status == "succeeded"


def test_producers_without_the_task_code_check_and_complete_runs_from_the_catalog(
    stack: Stack, client: Client
) -> None:
    """A worker publishes its tasks when it starts; the CLI, with no CONVEYOR_TASK_MODULES,
    refuses a misspelled name or wrong params and gives a run the task's max_attempts."""
    from domain.tasks import catalog

    worker = stack.worker("catalogq", name="catalogw", concurrency=1)
    try:
        eventually(lambda: "always_fails" in catalog.load(client.engine), timeout=60)
        env = {k: v for k, v in stack.env.items() if k != "CONVEYOR_TASK_MODULES"}

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "conveyor", *args],
                env=env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip

        typo = cli("enqueue", "nooop")
        assert typo.returncode == 2
        assert typo.stderr.startswith("error: no task or pipeline named 'nooop'; did you mean")
        wrong = cli("enqueue", "noop", "-p", 'i="x"')
        assert (wrong.returncode, wrong.stderr) == (
            2, 'error: params.i: "x" is not of type "integer"\n'
        )  # fmt: skip
        done = cli("enqueue", "always_fails", "--queue", "catalogq", "--wait", "--json")
        assert done.returncode == 1, done.stderr  # it failed, as it always does
        run = json.loads(done.stdout)
        assert (run["status"], run["attempt"], run["max_attempts"]) == ("failed", 3, 3)
    finally:
        stack.kill(worker, signal.SIGTERM)


def test_plain_celery_client_submits(stack: Stack, client: Client) -> None:
    plain = Celery(broker=stack.broker_url)
    for _ in range(2):  # the same idempotency key twice: one run
        plain.send_task(
            "conveyor.submit",
            kwargs={
                "name": "noop",
                "params": {"i": 42},
                "idempotency_key": "from-celery-1",
            },
        )
    plain.send_task("conveyor.submit", kwargs={"name": "noop", "params": [1, 2]})
    plain.send_task("conveyor.submit", kwargs={"name": "no_such_task"})
    plain.send_task("conveyor.execute", args=["not-a-uuid"])

    def submitted() -> list[object]:
        return [r for r in client.list(name="noop").items if r.triggered_by == "celery"]

    eventually(lambda: len(submitted()) == 1 and submitted()[0].status == "succeeded", timeout=30)  # type: ignore[attr-defined]
    assert submitted()[0].result == {"i": 42}  # type: ignore[attr-defined]
    with client.engine.connect() as conn:
        eventually(
            lambda: conn.execute(select(func.count()).select_from(dead_letters)).scalar_one() == 3
        )
        reasons = (
            conn.execute(select(dead_letters.c.reason).order_by(dead_letters.c.id)).scalars().all()
        )
    assert any("params: must be a JSON object" in r for r in reasons)
    assert any("no task or pipeline named 'no_such_task'" in r for r in reasons)
    assert any("malformed conveyor.execute message" in r for r in reasons)


class _NoPublish:
    def publish(self, dispatches: object) -> None:
        """Leave delivery to the test (the relay would also send it after the grace period)."""


def test_sigterm_lets_short_runs_finish_and_hands_long_ones_back(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    stack.env["CONVEYOR_SHUTDOWN_GRACE_S"] = "2"
    try:
        leaving = stack.worker("draining", name="leaving")
    finally:
        del stack.env["CONVEYOR_SHUTDOWN_GRACE_S"]
    short_marks, long_marks = tmp_path / "short", tmp_path / "long"
    short = client.enqueue(
        "side_effect", {"marks": str(short_marks), "seconds": 1}, queue="draining"
    )
    long = client.enqueue("side_effect", {"marks": str(long_marks), "seconds": 6}, queue="draining")
    eventually(
        lambda: marks(short_marks) == ["start 1"] and marks(long_marks) == ["start 1"], timeout=60
    )
    assert stack.terminate(leaving) == 0  # returns when it is gone: grace, then hand-back
    assert client.get(short.id).status == "succeeded"  # finished within the grace period
    handed_back = client.get(long.id)
    assert (handed_back.status, handed_back.attempt) == ("pending", 0)  # not counted as tried
    assert marks(long_marks) == ["start 1"]
    taker = stack.worker("draining", name="taker")
    try:
        assert client.wait(long.id, timeout=60).status == "succeeded"
    finally:
        stack.kill(taker, signal.SIGTERM)
    assert marks(long_marks) == ["start 1", "start 1", "done 1"]


def test_workers_register_and_say_when_they_stop(stack: Stack, client: Client) -> None:
    from domain.db.models import workers

    def rows() -> list[dict[str, object]]:
        with client.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(workers)).mappings()]

    eventually(lambda: any(not r["stopped"] for r in rows()), timeout=30)
    alive = [r for r in rows() if not r["stopped"] and "default" in r["queues"]["names"]]
    assert alive and all(r["pid"] and r["hostname"] for r in alive)
    assert "celery" in alive[0]["queues"]["names"]  # the submit queue is consumed too


def test_task_events_reach_monitors_complete_and_batched(stack: Stack, client: Client) -> None:
    """Every run's received/started/succeeded events are published (Flower's feed), several
    to a Redis message instead of one publish per event loop turn (worker/consumer.py)."""
    pubsub = stack.redis.pubsub()
    pubsub.psubscribe(f"/{stack.redis.connection_pool.connection_kwargs['db']}.celeryev/task.*")
    try:
        pubsub.get_message(timeout=1)  # the subscribe confirmation
        ids = [r.id for r in client.enqueue_many({"name": "noop"} for _ in range(60))]
        eventually(lambda: statuses(client, ids) == {"succeeded": 60})
        events: dict[str, set[str]] = {}  # celery task id -> event types
        run_of: dict[str, str] = {}  # celery task id -> run id
        messages = 0
        every_event = {"task-received", "task-started", "task-succeeded"}

        def read_all_of_ours() -> bool:
            """Take the messages waiting; True once every run's three events were read."""
            nonlocal messages
            while (message := pubsub.get_message(timeout=0.05)) is not None:
                if message["type"] != "pmessage":
                    continue
                envelope = json.loads(message["data"])
                body = json.loads(base64.b64decode(envelope["body"]))
                batch = body if isinstance(body, list) else [body]
                ours = False
                for event in batch:
                    if event.get("type") == "task-received":
                        run_of[event["uuid"]] = ast.literal_eval(event["args"])[0]
                    events.setdefault(event["uuid"], set()).add(event["type"])
                    ours = ours or event["uuid"] in run_of
                messages += ours
            by_run = {run_of[t]: types for t, types in events.items() if t in run_of}
            return all(by_run.get(str(i), set()) >= every_event for i in ids)

        eventually(read_all_of_ours, timeout=10, what="every run's task events")
    finally:
        pubsub.close()
    assert messages <= 60 * 3 / 4, f"{messages} messages for 180 events: not batched"
