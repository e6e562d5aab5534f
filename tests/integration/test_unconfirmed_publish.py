"""A single enqueue publishes without waiting for Redis's reply (`send_unconfirmed`): the
reply is read before the thread's next publish, or at `flush()`. Whatever Redis did not take is
handed back to the relay as soon as that is known, and no run is ever neither queued nor
handed back. Real Redis (the session's private one) and real PostgreSQL."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import Engine, select

from conveyor import Client
from domain.clock import utc_now
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.ports import Dispatch
from domain.runs import enqueue
from domain.runs.recovery import relay_once
from domain.runs.requests import build_request
from domain.settings import load_settings
from worker.app import create_app
from worker.publisher import CeleryPublisher
from worker.routing import priority_for_broker

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


@pytest.fixture
def publisher(redis_url: str) -> Iterator[CeleryPublisher]:
    made = CeleryPublisher(create_app(load_settings(broker_url=redis_url)))
    yield made
    made.flush()


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def queued(admin: redis.Redis, queue: str) -> list[str]:
    """Run ids waiting in `queue` at any priority (kombu keeps a list per level: `q:4` for
    conveyor's default), oldest first (LPUSH puts the newest at the head)."""
    keys = [queue, *admin.scan_iter(f"{queue}:*")]
    return [json.loads(m)["headers"]["id"] for k in keys for m in reversed(admin.lrange(k, 0, -1))]


#: The Redis list of conveyor's default priority (5) on a queue: kombu's `queue:level` key.
LEVEL = f":{priority_for_broker('redis://', 5)}"
BLOCKED = f"blocked{LEVEL}"


def dispatched_at(engine: Engine, run_id: uuid.UUID) -> object:
    with engine.connect() as conn:
        return conn.execute(select(runs.c.dispatched_at).where(runs.c.id == run_id)).scalar_one()


def one(queue: str) -> Dispatch:
    return Dispatch(uuid.uuid4(), "t", queue, 5)


def test_unconfirmed_sends_arrive_in_order_and_flush_reads_every_reply(
    publisher: CeleryPublisher, admin: redis.Redis
) -> None:
    lost: list[int] = []
    sent = [one("uq") for _ in range(50)]
    for i, d in enumerate(sent):
        publisher.send_unconfirmed([d], lambda i=i: lost.append(i))  # type: ignore[misc]
    publisher.flush()
    assert queued(admin, "uq") == [str(d.run_id) for d in sent]
    assert lost == []
    assert all(not line.pending for line in publisher._unconfirmed._lines)


def test_a_send_redis_refuses_is_told_lost_and_the_replies_after_it_stay_in_step(
    publisher: CeleryPublisher, admin: redis.Redis
) -> None:
    admin.set(BLOCKED, "not a list")  # LPUSH answers WRONGTYPE
    lost: list[str] = []
    publisher.send_unconfirmed([one("blocked")], lambda: lost.append("blocked"))
    assert lost == []  # not known yet: the reply is read before the next send
    fine = one("open")
    publisher.send_unconfirmed([fine], lambda: lost.append("open"))
    assert lost == ["blocked"]
    publisher.send_unconfirmed([one("blocked")], lambda: lost.append("blocked again"))
    publisher.flush()
    assert lost == ["blocked", "blocked again"]
    assert queued(admin, "open") == [str(fine.run_id)]


def test_a_dropped_connection_leaves_every_run_queued_or_told_lost(
    publisher: CeleryPublisher, admin: redis.Redis
) -> None:
    """Redis drops the sending connection between sends: which replies were read before, and
    whether the drop is seen before the next write, are races; but no run may end neither
    queued nor told lost, and a send after the drop opens a connection again."""
    lost: set[str] = set()
    sent = []
    for _ in range(5):
        for _ in range(3):
            d = one("dq")
            sent.append(str(d.run_id))
            publisher.send_unconfirmed([d], lambda d=d: lost.add(str(d.run_id)))  # type: ignore[misc]
        admin.client_kill_filter(_type="normal", skipme=True)
    publisher.flush()
    after = one("dq")
    publisher.send_unconfirmed([after], lambda: lost.add(str(after.run_id)))
    publisher.flush()
    in_redis = set(queued(admin, "dq"))
    assert set(sent) <= in_redis | lost
    assert str(after.run_id) in in_redis and str(after.run_id) not in lost


def test_a_run_redis_refused_goes_back_to_the_relay_which_publishes_it(
    pg_engine: Engine, publisher: CeleryPublisher, admin: redis.Redis
) -> None:
    admin.set(f"refusing{LEVEL}", "not a list")
    request = build_request(name="t", queue="refusing")
    run = enqueue.enqueue(UnitOfWork(pg_engine), request, publisher=publisher).run
    assert dispatched_at(pg_engine, run.id) is not None  # sent, not yet confirmed
    publisher.flush()
    assert dispatched_at(pg_engine, run.id) is None  # handed back: the relay's now
    admin.delete(f"refusing{LEVEL}")
    result = relay_once(pg_engine, publisher, clock=utc_now, grace_s=3600)
    assert result.published == 1
    assert queued(admin, "refusing") == [str(run.id)]


def test_client_close_hears_from_redis_about_what_it_enqueued(
    pg_url: str, redis_url: str, admin: redis.Redis
) -> None:
    admin.set(f"refusing{LEVEL}", "not a list")
    client = Client(load_settings(database_url=pg_url, broker_url=redis_url))
    run = client.enqueue("t", {}, queue="refusing", allow_unknown=True)
    client.close()
    assert dispatched_at(client.engine, run.id) is None
    client.close()


def test_threads_sending_unconfirmed_each_keep_their_replies(
    publisher: CeleryPublisher, admin: redis.Redis
) -> None:
    """Each thread writes on its own connection: replies never cross between threads."""
    admin.set(BLOCKED, "not a list")
    lost: list[tuple[int, str]] = []
    lock = threading.Lock()

    def produce(k: int) -> None:
        for i in range(40):
            queue = "blocked" if i % 10 == 0 else f"tq{k}"
            publisher.send_unconfirmed(
                [one(queue)], lambda q=queue: (lock.acquire(), lost.append((k, q)), lock.release())
            )

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    publisher.flush()
    assert sorted(lost) == sorted((k, "blocked") for k in range(4) for _ in range(4))
    assert [len(queued(admin, f"tq{k}")) for k in range(4)] == [36] * 4


def test_a_connection_redis_closed_while_idle_is_replaced_before_the_next_send(
    publisher: CeleryPublisher, admin: redis.Redis
) -> None:
    """Redis ended the idle connection (a restart, its `timeout`): the next send must not be
    written into it, to be found lost only at the send after."""
    lost: list[str] = []
    publisher.send_unconfirmed([one("iq")], lambda: lost.append("first"))
    publisher.flush()
    admin.client_kill_filter(_type="normal", skipme=True)
    second = one("iq")
    publisher.send_unconfirmed([second], lambda: lost.append("second"))
    publisher.flush()
    assert lost == []
    assert queued(admin, "iq")[-1] == str(second.run_id)
