"""PostgreSQL stopped under a running worker (a private cluster, immediate shutdown): submits
from plain Celery clients and poison messages that arrive meanwhile are not lost, and each
becomes exactly one run or one dead letter once the database is back."""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator

import pytest
from celery import Celery
from sqlalchemy import func, select

from domain.db.migrate import upgrade
from domain.db.models import dead_letters, run_logs, runs
from tests.e2e.stack import Stack
from tests.polling import eventually
from tests.services import PrivatePostgres, PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SUBMITS = 10


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    upgrade(server.url())
    yield server
    server.close()


@pytest.fixture
def stack(
    postgres: PrivatePostgres, redis_server: PrivateRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    s = Stack(postgres.url(), tmp_path_factory.mktemp("outage-logs"), redis_server.url(16))
    s.redis.flushdb()
    yield s
    s.stop_all()


def counts(stack: Stack) -> tuple[dict[str, int], int]:
    """Runs submitted through Celery, by status; and dead letters."""
    with stack.client() as client, client.engine.connect() as conn:
        by_status = conn.execute(
            select(runs.c.status, func.count())
            .where(runs.c.triggered_by == "celery")
            .group_by(runs.c.status)
        ).all()
        letters = conn.execute(select(func.count()).select_from(dead_letters)).scalar_one()
    return {status: n for status, n in by_status}, letters


def queued(stack: Stack) -> int:
    return sum(int(stack.redis.llen(k)) for k in stack.redis.keys("celery*"))


def deferred(stack: Stack, name: str) -> set[str]:
    """The message ids the worker's log says it deferred (JSON lines, event `submit.deferred`
    or `message.dead_letter_deferred`)."""
    found = set()
    for line in (stack.logs / f"{name}.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") in {"submit.deferred", "message.dead_letter_deferred"}:
                found.add(str(event.get("message_id")))
    return found


def test_submits_and_poison_wait_out_a_database_outage(
    stack: Stack, postgres: PrivatePostgres
) -> None:
    worker = stack.worker("default", name="outage", concurrency=2)
    with stack.client() as client:  # ready: it has run a task
        assert client.wait(client.enqueue("noop").id, timeout=60).status == "succeeded"
    plain = Celery(broker=stack.broker_url)

    postgres.stop()
    sent = [
        plain.send_task("conveyor.submit", kwargs={"name": "noop", "params": {"i": i}}).id
        for i in range(SUBMITS)
    ]
    stack.redis.lpush("celery", b"hello")
    # The worker took them all while the database was down (it prefetches two at most, so
    # it tried at least eight then).
    eventually(lambda: queued(stack) == 0, timeout=60)
    postgres.start()

    eventually(lambda: counts(stack) == ({"succeeded": SUBMITS}, 1), timeout=120)
    assert worker.poll() is None
    with stack.client() as client, client.engine.connect() as conn:
        rows = conn.execute(
            select(runs.c.id, runs.c.trigger_ref, runs.c.attempt, runs.c.result).where(
                runs.c.triggered_by == "celery"
            )
        ).all()
        lines = dict(
            conn.execute(
                select(run_logs.c.run_id, func.count())
                .where(run_logs.c.run_id.in_([r.id for r in rows]))
                .group_by(run_logs.c.run_id)
            ).all()
        )
        letter = conn.execute(select(dead_letters)).mappings().one()
    assert sorted(r.trigger_ref for r in rows) == sorted(sent)  # one run per submit
    assert sorted(r.result["i"] for r in rows) == list(range(SUBMITS))
    assert {r.attempt for r in rows} == {1}  # each ran once
    assert all(lines[r.id] == 1 for r in rows)  # each logged its one "noop ran" line once
    assert base64.b64decode(letter["body"]["raw"]) == b"hello"
    assert "not a JSON message" in letter["reason"]
    assert stack.redis.hlen("unacked") == 0
    assert len(deferred(stack, "outage") & set(sent)) >= SUBMITS - 2  # the retries did it
    stack.kill(worker, signal.SIGTERM)


def test_a_worker_idle_through_an_outage_runs_its_next_runs(
    stack: Stack, postgres: PrivatePostgres
) -> None:
    """Nothing arrives while the database is down, so no child notices: after the restart the
    connections every child opened before it (pooled and its own) are dead, and the first
    runs must not fail on them."""
    worker = stack.worker("default", name="idle", concurrency=2)
    with stack.client() as client:
        assert client.wait(client.enqueue("noop").id, timeout=60).status == "succeeded"
    postgres.stop()
    postgres.start()
    with stack.client() as client:
        ids = [client.enqueue("noop", params={"i": i}).id for i in range(8)]
        done = [client.wait(run_id, timeout=60) for run_id in ids]
    assert [(r.status, r.attempt) for r in done] == [("succeeded", 1)] * 8, [r.error for r in done]
    assert worker.poll() is None
    stack.kill(worker, signal.SIGTERM)


def test_a_run_delivered_while_the_database_is_down_runs_once_it_is_back(
    stack: Stack, postgres: PrivatePostgres
) -> None:
    """Its claim cannot reach the database: the message is tried again after a backoff (one
    warning line, no traceback), not spent, so the run starts when the database returns
    without waiting for the relay (no scheduler runs here)."""
    worker = stack.worker("default", name="claims", concurrency=1)
    with stack.client() as client:
        assert client.wait(client.enqueue("noop").id, timeout=60).status == "succeeded"
        run_id = client.enqueue("noop", params={"i": 1}, delay_s=3600).id  # not published
        with client.engine.begin() as conn:  # due now, as the scheduler would find it
            conn.execute(runs.update().where(runs.c.id == run_id).values(not_before=func.now()))
    postgres.stop()
    Celery(broker=stack.broker_url).send_task("conveyor.execute", args=[str(run_id)])
    eventually(lambda: "run.claim_deferred" in events(stack, "claims"), timeout=30)
    postgres.start()
    with stack.client() as client:
        run = client.wait(run_id, timeout=60)
    assert (run.status, run.attempt) == ("succeeded", 1)
    assert "raised unexpected" not in (stack.logs / "claims.log").read_text(errors="replace")
    assert worker.poll() is None
    stack.kill(worker, signal.SIGTERM)


def events(stack: Stack, name: str) -> list[str]:
    lines = (stack.logs / f"{name}.log").read_text(errors="replace").splitlines()
    return [json.loads(line).get("event", "") for line in lines if line.startswith("{")]


def test_a_poison_held_by_a_killed_worker_is_dead_lettered_by_the_next(
    stack: Stack, postgres: PrivatePostgres
) -> None:
    """While its dead letter cannot be written a refused message stays unacked, so kombu's
    bookkeeping still has it when the worker is killed: the next worker dead-letters it, once."""
    stack.env["CONVEYOR_BROKER_VISIBILITY_TIMEOUT_S"] = "1"  # restored 1 s after the kill
    worker = stack.worker("default", name="holder", concurrency=1)
    with stack.client() as client:
        assert client.wait(client.enqueue("noop").id, timeout=60).status == "succeeded"
    postgres.stop()
    stack.redis.lpush("celery", b"\x00poison")
    eventually(lambda: "None" in deferred(stack, "holder"), timeout=30)
    stack.kill(worker, signal.SIGKILL)
    assert stack.redis.hlen("unacked") == 1
    postgres.start()
    successor = stack.worker("default", name="successor", concurrency=1)
    try:
        eventually(lambda: counts(stack)[1] == 1, timeout=60)
        with stack.client() as client, client.engine.connect() as conn:
            letter = conn.execute(select(dead_letters)).mappings().one()
        assert base64.b64decode(letter["body"]["raw"]) == b"\x00poison"
        eventually(lambda: stack.redis.hlen("unacked") == 0, timeout=10)
        assert successor.poll() is None
    finally:
        stack.kill(successor, signal.SIGTERM)
