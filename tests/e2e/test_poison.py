"""Poison messages pushed raw into a real worker's queue: each one is dead-lettered with its
raw bytes and the reason, acked, and never restored; the worker lives on and runs the next task.

The bodies are what an operator's `redis-cli lpush celery ...`, a broken client or an intruder
could put there: garbage, bad JSON, bad base64, envelopes of the wrong shape, protocol 1, a
huge body, a task nobody registered.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from domain.db.models import dead_letters
from tests.e2e.stack import Stack
from tests.polling import eventually
from tests.services import PrivateRedis
from worker.deadletter import MAX_RAW_BYTES

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

QUEUE = "celery"  # the submit queue every worker consumes


@pytest.fixture(scope="module")
def stack(
    pg_database: str, redis_server: PrivateRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    s = Stack(pg_database, tmp_path_factory.mktemp("poison-logs"), redis_server.url(12))
    s.redis.flushdb()
    yield s
    s.stop_all()


@pytest.fixture
def worker(stack: Stack, pg_url: str) -> Iterator[Any]:
    """A worker on a clean database (pg_url truncates), ready: it has run a task."""
    proc = stack.worker("default", name="poisoned", concurrency=1)
    with stack.client() as client:
        assert client.wait(client.enqueue("noop").id, timeout=60).status == "succeeded"
    yield proc
    stack.kill(proc)


def envelope(
    body: bytes,
    headers: Any,
    *,
    content_type: str = "application/json",
    **properties: Any,
) -> dict[str, Any]:
    """A message as kombu's Redis transport stores it (base64 body, delivery info, tag)."""
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            **properties,
        },
    }


def encoded(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def task_headers(task: str = "conveyor.submit", **extra: Any) -> dict[str, Any]:
    return {"lang": "py", "task": task, "id": str(uuid.uuid4()), **extra}


def body(args: Any = (), kwargs: Any = None, embed: Any = None) -> bytes:
    return json.dumps([list(args), kwargs if kwargs is not None else {}, embed or {}]).encode()


@dataclass
class Poison:
    name: str
    raw: bytes  # what is pushed into the Redis list
    reason: str  # a fragment of the dead letter's reason
    stored: bytes | None = None  # the bytes the dead letter keeps (default: all of `raw`)


def _poisons() -> list[Poison]:
    no_tag = envelope(body(), task_headers())
    del no_tag["properties"]["delivery_tag"]
    no_route = envelope(body(), task_headers())
    no_route["properties"]["delivery_info"] = {"exchange": ""}
    bad_base64 = envelope(b"", task_headers())
    bad_base64["body"] = "!!! this is not base64 !!!"
    odd_encoding = envelope(body(), task_headers())
    odd_encoding["properties"]["body_encoding"] = "rot13"
    surrogate = envelope(b"", task_headers())
    surrogate["body"] = "\ud800"
    del surrogate["properties"]["body_encoding"]
    proto1 = json.dumps(
        {"task": "conveyor.submit", "id": str(uuid.uuid4()), "args": [], "kwargs": {"name": "noop"}}
    ).encode()
    shapeless = json.dumps({"a": 1}).encode()
    return [
        Poison("garbage", b"hello", "not a JSON"),
        Poison("not utf-8", b"\xff\xfe\x00\x81 binary", "not a JSON"),
        Poison("truncated JSON", encoded(envelope(body(), task_headers()))[:-7], "not a JSON"),
        Poison("a JSON list", b"[1, 2, 3]", "not a JSON object"),
        Poison("no properties", b'{"body": "aGk=", "headers": {}}', "properties"),
        Poison("no delivery tag", encoded(no_tag), "delivery_tag"),
        Poison("no routing key", encoded(no_route), "routing_key"),
        Poison("headers a list", encoded(envelope(body(), [1, 2])), "headers"),
        Poison("bad base64", encoded(bad_base64), "base64"),
        Poison("unknown body encoding", encoded(odd_encoding), "rot13"),
        Poison("lone surrogate", encoded(surrogate), "UTF-8"),
        Poison(
            "the crash loop of issue 16: no id, a dict for a body",
            encoded(envelope(shapeless, {"task": "conveyor.submit"})),
            "headers.id",
            stored=shapeless,
        ),
        Poison(
            "a dict for a body",
            encoded(envelope(shapeless, task_headers())),
            "[args, kwargs, embed]",
            stored=shapeless,
        ),
        Poison(
            "body not JSON",
            encoded(envelope(b"{not json", task_headers())),
            "cannot be decoded",
            stored=b"{not json",
        ),
        Poison(
            "pickle",
            encoded(
                envelope(
                    b"\x80\x04K\x01.", task_headers(), content_type="application/x-python-serialize"
                )
            ),
            "application/x-python-serialize",
            stored=b"\x80\x04K\x01.",
        ),
        Poison(
            "protocol 1",
            encoded(envelope(proto1, {})),
            "protocol 1",
            stored=proto1,
        ),
        Poison(
            "kwargs a list",
            encoded(envelope(body(kwargs=[1]), task_headers())),
            "[args, kwargs, embed]",
            stored=body(kwargs=[1]),
        ),
        Poison(
            "time limits not numbers",
            encoded(envelope(body(), task_headers(timelimit=["x", "y"]))),
            "timelimit",
            stored=body(),
        ),
        Poison(
            "eta not a time",
            encoded(envelope(body(), task_headers(eta="soon"))),
            "ETA",
            stored=body(),
        ),
        Poison(
            "unregistered task",
            encoded(envelope(body(), task_headers("nope"))),
            "unregistered task 'nope'",
            stored=body(),
        ),
    ]


POISONS = _poisons()


def dead_letter_rows(stack: Stack) -> list[dict[str, Any]]:
    with stack.client() as client, client.engine.connect() as conn:
        return [
            dict(r)
            for r in conn.execute(select(dead_letters).order_by(dead_letters.c.id)).mappings()
        ]


def stored_bytes(row: dict[str, Any]) -> bytes:
    return base64.b64decode(row["body"]["raw"])


def left_in_redis(stack: Stack) -> dict[str, int]:
    return {
        "queued": sum(int(stack.redis.llen(k)) for k in stack.redis.keys(f"{QUEUE}*")),
        "unacked": int(stack.redis.hlen("unacked")),
        "unacked_index": int(stack.redis.zcard("unacked_index")),
    }


def test_every_poison_is_dead_lettered_and_the_worker_lives_on(stack: Stack, worker: Any) -> None:
    for n, poison in enumerate(POISONS, start=1):
        stack.redis.lpush(QUEUE, poison.raw)
        try:
            eventually(lambda n=n: len(dead_letter_rows(stack)) == n, timeout=30)
        except AssertionError:
            alive = "alive" if worker.poll() is None else f"dead (exit {worker.returncode})"
            pytest.fail(f"{poison.name}: no dead letter; the worker is {alive}")
        row = dead_letter_rows(stack)[-1]
        assert poison.reason in row["reason"], (poison.name, row["reason"])
        assert stored_bytes(row) == (poison.stored if poison.stored is not None else poison.raw)
        assert row["body"]["size"] == len(poison.stored or poison.raw)
        assert worker.poll() is None, f"{poison.name} ended the worker"
    eventually(lambda: left_in_redis(stack) == {"queued": 0, "unacked": 0, "unacked_index": 0})
    with stack.client() as client:
        assert client.wait(client.enqueue("noop").id, timeout=30).status == "succeeded"


def test_a_huge_body_is_kept_bounded(stack: Stack, worker: Any) -> None:
    raw = os.urandom(4 * 1024 * 1024)
    stack.redis.lpush(QUEUE, raw)
    eventually(lambda: len(dead_letter_rows(stack)) == 1, timeout=60)
    row = dead_letter_rows(stack)[0]
    assert "not a JSON" in row["reason"]
    assert row["body"]["size"] == len(raw) and row["body"]["truncated"] is True
    assert stored_bytes(row) == raw[:MAX_RAW_BYTES]
    assert worker.poll() is None
    with stack.client() as client:
        assert client.wait(client.enqueue("noop").id, timeout=30).status == "succeeded"


def test_a_poison_is_not_restored_at_the_next_start(stack: Stack, worker: Any) -> None:
    """The message that crash-looped workers: after its dead letter, nothing of it is left for
    kombu to restore, so a restarted worker does not meet it again."""
    crash = encoded(envelope(b'{"a": 1}', {"task": "conveyor.submit"}))
    stack.redis.lpush(QUEUE, crash)
    eventually(lambda: len(dead_letter_rows(stack)) == 1, timeout=30)
    assert stack.terminate(worker) == 0  # a warm shutdown restores what is still unacked
    assert left_in_redis(stack) == {"queued": 0, "unacked": 0, "unacked_index": 0}
    again = stack.worker("default", name="restarted", concurrency=1)
    try:
        with stack.client() as client:
            assert client.wait(client.enqueue("noop").id, timeout=60).status == "succeeded"
        assert len(dead_letter_rows(stack)) == 1
        assert again.poll() is None
    finally:
        stack.kill(again)


def test_submits_no_column_can_hold_are_dead_letters(stack: Stack, worker: Any) -> None:
    """From a plain Celery client: values PostgreSQL refuses, and a task nobody registered,
    each end as a dead letter saying what was wrong, and no run is written."""
    plain = Celery(broker=stack.broker_url)
    bad = {
        "nul in params": ({"name": "noop", "params": {"s": "a\x00b"}}, "params.s: text must"),
        "nul in a key": ({"name": "noop", "idempotency_key": "k\x00"}, "idempotency_key: text"),
        "beyond 64 bits": ({"name": "noop", "params": {"n": 2**70}}, "params.n: integer out of"),
        "not finite": ({"name": "noop", "timeout_s": float("inf")}, "timeout_s: expected a finite"),
        # Within 64 bits, beyond the column's 32: the database's DataError is the last line.
        "beyond the column": ({"name": "noop", "max_requests": 2**40}, "max_requests"),
    }
    ids = {
        what: plain.send_task("conveyor.submit", kwargs=kwargs).id
        for what, (kwargs, _) in bad.items()
    }
    ids["unregistered"] = plain.send_task("nope", kwargs={"x": 1}).id
    eventually(lambda: len(dead_letter_rows(stack)) == len(ids), timeout=60)
    reasons = {row["message_id"]: row["reason"] for row in dead_letter_rows(stack)}
    for what, (_, expected) in bad.items():
        reason = reasons[ids[what]]
        assert expected in reason or "out of range" in reason, (what, reason)
    assert "unregistered task 'nope'" in reasons[ids["unregistered"]]
    with stack.client() as client:
        assert [r for r in client.list().items if r.triggered_by == "celery"] == []
    assert worker.poll() is None
