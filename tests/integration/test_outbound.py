"""Callbacks and notifications out, against a local HTTP receiver: signed, retried with backoff
while the receiver is down or answers 500, given up after the deadline, and every attempt
visible in the run's events. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, select, update

from domain.callbacks import outbound
from domain.callbacks import rules as notify_rules
from domain.callbacks.messages import signing_key
from domain.clock import utc_now
from domain.db.models import run_logs, runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput
from domain.ports import OpenCatalog
from domain.runs import enqueue
from domain.runs.requests import build_request
from domain.security import crypto
from domain.settings import Settings, load_settings
from domain.webhooks import inbound as webhooks
from scheduler.deliveries import OutboundSweeper, PassReport, non_public_address
from scheduler.service import SchedulerService
from tests.fakes import FakeClock, FakePublisher
from tests.http_receiver import Receiver, free_port
from tests.polling import eventually

SECRET_KEY = Fernet.generate_key().decode()


@pytest.fixture
def settings(db_url: str) -> Settings:
    return load_settings(
        database_url=db_url,
        secret_key=SECRET_KEY,
        outbound_backoff_s=2,
        outbound_backoff_max_s=60,
        outbound_deadline_s=300,
        outbound_timeout_s=2,
        outbound_allow_private=True,  # the receivers here listen on 127.0.0.1
    )


@pytest.fixture
def sweeper(engine: Engine, settings: Settings, clock: FakeClock) -> OutboundSweeper:
    return OutboundSweeper(engine, settings, clock=clock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def finished_run(
    engine: Engine,
    clock: FakeClock,
    name: str = "report",
    status: str = "failed",
    callback_url: str | None = None,
    **values: Any,
) -> uuid.UUID:
    """A run as a worker leaves it: ended now (the fake clock's now)."""
    req = build_request(name=name, callback_url=callback_url)
    run = enqueue.enqueue(UnitOfWork(engine, clock=clock), req, catalog=OpenCatalog()).run
    fields = {"error_type": "ValueError", "error": "boom"} if status != "succeeded" else {}
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run.id)
            .values(
                status=status,
                attempt=1,
                started_at=clock.now - timedelta(seconds=2),
                finished_at=clock.now,
                **fields,
                **values,
            )
        )
    return run.id


def events(engine: Engine, run_id: uuid.UUID) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(run_logs.c.seq, run_logs.c.level, run_logs.c.message, run_logs.c.fields)
            .where(run_logs.c.run_id == run_id, run_logs.c.stream == "event")
            .order_by(run_logs.c.seq)
        ).mappings()
        return [dict(row) for row in rows]


def verify(post: Any, secret: str) -> dict[str, Any]:
    """Check the signature the way a receiver would (the inbound webhook's own checks)."""
    ts = webhooks.check_timestamp(
        post.headers["x-conveyor-timestamp"], now=utc_now(), tolerance_s=300
    )
    webhooks.check_signature(secret, ts, post.body, post.headers["x-conveyor-signature"])
    body: dict[str, Any] = json.loads(post.body)
    return body


def test_a_callback_is_signed_and_carries_the_run_summary(
    engine: Engine, clock: FakeClock, sweeper: OutboundSweeper, receiver: Receiver
) -> None:
    run_id = finished_run(
        engine, clock, status="succeeded", callback_url=f"{receiver.url}/done?k=1", result={"n": 3}
    )
    report = sweeper.run_once()
    assert (report.queued, report.delivered) == (1, 1)

    [post] = receiver.posts()
    assert post.path == "/done?k=1"
    assert post.headers["x-conveyor-delivery"] == f"{run_id}:1"
    assert post.headers["content-type"] == "application/json"
    body = verify(post, signing_key(SECRET_KEY))
    assert body["id"] == str(run_id) and body["status"] == "succeeded"
    assert body["result"] == {"n": 3} and "error" not in body
    assert body["attempt"] == 1 and body["duration_s"] == 2.0
    assert body["cost"] == {"usd": "0", "tokens_in": 0, "tokens_out": 0, "requests": 0}

    [row] = outbound.deliveries_of(engine, [run_id])
    assert row.delivered_at == clock.now and row.attempts == 1 and row.last_error is None
    [event] = events(engine, run_id)
    assert event["message"] == f"callback to {receiver.url}/… delivered (HTTP 200, attempt 1)"
    assert event["fields"]["event"] == "outbound.delivered"
    assert "k=1" not in json.dumps(event)  # a URL's path and query may hold a credential

    assert sweeper.run_once().queued == 0  # the overlap re-reads it; nothing new
    assert len(receiver.posts()) == 1


def test_a_receiver_answering_500_gets_retries_with_backoff_until_it_recovers(
    engine: Engine, clock: FakeClock, sweeper: OutboundSweeper, receiver: Receiver
) -> None:
    receiver.answers.extend([500, 500])
    run_id = finished_run(engine, clock, callback_url=receiver.url)
    assert sweeper.run_once().retried == 1
    clock.advance(1)  # the first retry is due after 2 s
    assert sweeper.run_once().retried == 0
    clock.advance(1)
    assert sweeper.run_once().retried == 1  # then 4 s
    clock.advance(4)
    assert sweeper.run_once().delivered == 1

    posts = receiver.posts()
    assert len(posts) == 3
    assert {p.headers["x-conveyor-delivery"] for p in posts} == {f"{run_id}:1"}
    for post in posts:  # each attempt is signed anew
        verify(post, signing_key(SECRET_KEY))
    messages = [e["message"] for e in events(engine, run_id)]
    assert messages == [
        f"callback to {receiver.url} failed: HTTP 500 (attempt 1); next try in 2s",
        f"callback to {receiver.url} failed: HTTP 500 (attempt 2); next try in 4s",
        f"callback to {receiver.url} delivered (HTTP 200, attempt 3)",
    ]
    assert [e["level"] for e in events(engine, run_id)] == ["warning", "warning", "info"]


def test_a_receiver_that_is_down_for_a_while_gets_the_callback_once_it_is_up(
    engine: Engine, clock: FakeClock, sweeper: OutboundSweeper
) -> None:
    receiver = Receiver(port=free_port())  # nothing listens there yet
    run_id = finished_run(engine, clock, callback_url=receiver.url)
    for step in (0, 2, 4):
        clock.advance(step)
        assert sweeper.run_once().retried == 1
    [row] = outbound.deliveries_of(engine, [run_id])
    assert row.attempts == 3 and row.delivered_at is None
    assert "ConnectError" in (row.last_error or "")
    with receiver:
        clock.advance(8)
        assert sweeper.run_once().delivered == 1
        assert len(receiver.posts()) == 1
    assert [e["fields"]["event"] for e in events(engine, run_id)] == [
        "outbound.retry",
        "outbound.retry",
        "outbound.retry",
        "outbound.delivered",
    ]


def test_a_delivery_is_given_up_after_the_deadline(
    engine: Engine, clock: FakeClock, settings: Settings
) -> None:
    sweeper = OutboundSweeper(
        engine, settings.model_copy(update={"outbound_deadline_s": 5}), clock=clock
    )
    run_id = finished_run(engine, clock, callback_url=f"http://127.0.0.1:{free_port()}/x")
    assert sweeper.run_once().retried == 1  # next try at +2 s, within 5 s
    clock.advance(2)
    assert sweeper.run_once().gave_up == 1  # +4 s more would pass the deadline
    clock.advance(60)
    assert sweeper.run_once() == PassReport()  # nothing left to do
    [row] = outbound.deliveries_of(engine, [run_id])
    assert row.gave_up_at is not None and row.attempts == 2
    last = events(engine, run_id)[-1]
    assert last["level"] == "error" and last["message"].endswith("(attempt 2); giving up")


def test_notification_rules_match_states_names_and_formats(
    engine: Engine, clock: FakeClock, sweeper: OutboundSweeper, receiver: Receiver
) -> None:
    uow = UnitOfWork(engine, clock=clock)
    before = finished_run(engine, clock, name="report.daily", status="failed")
    clock.advance(1)
    json_rule = notify_rules.add_rule(
        uow, on="failed,timed_out", url=f"{receiver.url}/oncall", actor="test"
    )
    slack_rule = notify_rules.add_rule(
        uow,
        on=["failed"],
        name_pattern="report.*",
        url=f"{receiver.url}/slack/T0/B0/secret",
        format="slack",
        actor="test",
    )
    clock.advance(1)
    failed = finished_run(engine, clock, name="report.daily", status="failed")
    timed_out = finished_run(engine, clock, name="etl", status="timed_out")
    finished_run(engine, clock, name="report.daily", status="succeeded")  # no rule wants it
    report = sweeper.run_once()
    assert (report.queued, report.delivered) == (3, 3)

    by_path: dict[str, list[dict[str, Any]]] = {}
    for post in receiver.posts():
        by_path.setdefault(post.path.split("/")[1], []).append(
            verify(post, signing_key(SECRET_KEY))
        )
    assert sorted(b["id"] for b in by_path["oncall"]) == sorted([str(failed), str(timed_out)])
    [slack] = by_path["slack"]
    assert set(slack) == {"text"}
    assert "report.daily" in slack["text"] and "failed" in slack["text"]
    assert "ValueError: boom" in slack["text"] and str(failed) in slack["text"]
    # The rule came after `before` ended: no history is reported.
    assert outbound.deliveries_of(engine, [before]) == []
    rules = {d.rule_id for d in outbound.deliveries_of(engine, [failed])}
    assert rules == {json_rule.id, slack_rule.id}
    notes = [e["message"] for e in events(engine, failed)]
    assert f"notification (rule {slack_rule.id}) to {receiver.url}/… delivered" in "".join(notes)
    assert "secret" not in json.dumps(events(engine, failed))


def test_a_run_finishing_just_before_the_cursor_is_still_seen(
    engine: Engine, clock: FakeClock, sweeper: OutboundSweeper, receiver: Receiver
) -> None:
    first = finished_run(engine, clock, callback_url=receiver.url)
    sweeper.run_once()
    # A finish stamped 1 s earlier whose transaction committed after that sweep.
    late = finished_run(engine, clock, callback_url=receiver.url)
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == late)
            .values(finished_at=clock.now - timedelta(seconds=1))
        )
    clock.advance(0.5)
    assert sweeper.run_once().delivered == 1
    ids = sorted(p.headers["x-conveyor-delivery"].split(":")[0] for p in receiver.posts())
    assert ids == sorted([str(first), str(late)])


def test_a_callback_of_a_webhook_run_is_signed_with_the_webhook_secret(
    engine: Engine, clock: FakeClock, sweeper: OutboundSweeper, receiver: Receiver
) -> None:
    uow = UnitOfWork(engine, clock=clock)
    hook, secret = webhooks.add_webhook(
        uow, "deploy", target="build", secret_key=SECRET_KEY, actor="test"
    )
    run = webhooks.accept(uow, hook, "d-1", {"ref": "main"}, catalog=OpenCatalog()).run
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run.id)
            .values(
                status="succeeded",
                attempt=1,
                started_at=clock.now,
                finished_at=clock.now,
                callback_url=receiver.url,
            )
        )
    assert sweeper.run_once().delivered == 1
    [post] = receiver.posts()
    assert verify(post, secret)["triggered_by"] == "webhook"


def test_without_a_secret_key_nothing_is_sent_and_the_reason_is_recorded(
    engine: Engine, clock: FakeClock, settings: Settings, receiver: Receiver
) -> None:
    sweeper = OutboundSweeper(engine, settings, clock=clock, secret_key="")
    run_id = finished_run(engine, clock, callback_url=receiver.url)
    assert sweeper.run_once().retried == 1
    assert receiver.posts() == []
    [event] = events(engine, run_id)
    assert "cannot sign: CONVEYOR_SECRET_KEY is not set" in event["message"]


def test_the_signing_key_follows_the_current_secret_key() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    assert signing_key(old) == signing_key(f" {old} ")
    assert signing_key(f"{new},{old}") == signing_key(new)
    assert signing_key(new) != signing_key(old)
    assert signing_key(new) != new  # not the encryption key itself
    with pytest.raises(crypto.ConfigurationError):
        signing_key(" , ")


class AlwaysLeader:
    def try_acquire(self) -> bool:
        return True

    def still_held(self) -> bool:
        return True

    def release(self) -> None:
        pass


def test_the_scheduler_leader_sends_callbacks_without_blocking_its_loop(
    engine: Engine, settings: Settings, receiver: Receiver
) -> None:
    silent = _silent_server()  # accepts connections, never answers
    publisher = FakePublisher()
    service = SchedulerService(
        settings.model_copy(update={"relay_interval_s": 0.05, "outbound_timeout_s": 60}),
        engine,
        publisher,
        leadership=AlwaysLeader(),
    )
    port = silent.getsockname()[1]
    stuck = finished_run(engine, FakeClock(utc_now()), callback_url=f"http://127.0.0.1:{port}/")
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: len(outbound.deliveries_of(engine, [stuck])) == 1, timeout=20)
        # The leader's outbound pass now waits on the silent receiver; its loop goes on: the
        # relay publishes a new run while that POST is still open.
        pending = enqueue.enqueue(
            UnitOfWork(engine), build_request(name="later"), catalog=OpenCatalog()
        ).run
        eventually(lambda: pending.id in {d.run_id for d in publisher.published}, timeout=20)
        # the stuck POST is still open: no attempt at it has ended
        assert [d.attempts for d in outbound.deliveries_of(engine, [stuck])] == [0]
        ok = finished_run(engine, FakeClock(utc_now()), callback_url=receiver.url)
        silent.close()  # the open POST fails; the next pass delivers the new callback
        eventually(lambda: len(receiver.posts()) == 1, timeout=20)
    finally:
        silent.close()
        service.stop()
        thread.join(10)
        service.outbound.join(10)
    assert receiver.posts()[0].headers["x-conveyor-delivery"] == f"{ok}:1"
    [row] = outbound.deliveries_of(engine, [stuck])
    assert row.attempts == 1 and row.delivered_at is None and row.last_error


def _silent_server() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_internal_addresses_are_refused_unless_allowed(
    engine: Engine, clock: FakeClock, settings: Settings, receiver: Receiver
) -> None:
    """A callback_url pointing inside the network (loopback here; the same for 10/8,
    169.254.169.254, ::1 ...) is refused without a request and given up at once."""
    strict = OutboundSweeper(
        engine, settings.model_copy(update={"outbound_allow_private": False}), clock=clock
    )
    run_id = finished_run(engine, clock, callback_url=receiver.url)
    assert strict.run_once().gave_up == 1
    assert receiver.posts() == []
    [event] = events(engine, run_id)
    assert "127.0.0.1, which is not a public address" in event["message"]
    assert "CONVEYOR_OUTBOUND_ALLOW_PRIVATE" in event["message"]


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://127.0.0.1:8080/x", True),
        ("http://localhost/x", True),
        ("http://10.1.2.3/x", True),
        ("http://169.254.169.254/latest/meta-data", True),
        ("http://[::1]/x", True),
        ("http://[::ffff:192.168.0.1]/x", True),
        ("http://[64:ff9b::7f00:1]/x", True),  # NAT64 of 127.0.0.1
        ("http://[2002:a00:1::]/x", True),  # 6to4 of 10.0.0.1
        ("http://[::7f00:1]/x", True),  # IPv4-compatible 127.0.0.1
        ("https://93.184.215.14/hook", False),
        ("https://no-such-host.invalid/hook", False),  # left to the POST (retried)
    ],
)
def test_non_public_address(url: str, refused: bool) -> None:
    assert (non_public_address(url) is not None) is refused


#: URLs the enqueue check refuses now, as rows written before it (or around it) may hold them.
UNDELIVERABLE = [
    "http://0177.0.0.1/x",
    "http://127.000.000.001/x",
    "http://2130706433/x",
    "http://☃.net/x",
    "http://xn--zz.com/x",
    "http://host:99999/x",
]


def test_one_bad_url_fails_alone_and_is_given_up_at_once(
    engine: Engine, clock: FakeClock, sweeper: OutboundSweeper, receiver: Receiver
) -> None:
    """httpx refuses these URLs; before each row stood alone, the refusal ended every pass
    and no delivery behind it was sent or given up."""
    bad = []
    for url in UNDELIVERABLE:
        run_id = finished_run(engine, clock)
        with engine.begin() as conn:  # as a row from before the check would be
            conn.execute(update(runs).where(runs.c.id == run_id).values(callback_url=url))
        bad.append(run_id)
    good = finished_run(engine, clock, callback_url=f"{receiver.url}/ok")
    clock.advance(1)  # the rule is for runs that end after it
    uow = UnitOfWork(engine, clock=clock)
    notify_rules.add_rule(uow, on="failed", url=f"{receiver.url}/n", actor="t")
    clock.advance(1)
    noted = finished_run(engine, clock)

    report = sweeper.run_once()
    assert (report.delivered, report.gave_up, report.retried) == (2, len(bad), 0)
    assert sorted(p.path for p in receiver.posts()) == ["/n", "/ok"]
    for run_id, url in zip(bad, UNDELIVERABLE, strict=True):
        [event] = events(engine, run_id)
        assert event["fields"]["event"] == "outbound.gave_up", url
        assert "refused: " in event["message"] and event["message"].endswith("giving up")
    assert "four decimal numbers" in events(engine, bad[0])[0]["fields"]["error"]
    assert [e["fields"]["event"] for e in events(engine, good)] == ["outbound.delivered"]
    assert [e["fields"]["event"] for e in events(engine, noted)] == ["outbound.delivered"]
    clock.advance(3600)
    assert sweeper.run_once() == PassReport()  # nothing owed, nothing stuck


def test_disguised_loopback_addresses_are_refused_without_a_request(
    engine: Engine, clock: FakeClock, settings: Settings, receiver: Receiver
) -> None:
    strict = OutboundSweeper(
        engine, settings.model_copy(update={"outbound_allow_private": False}), clock=clock
    )
    port = receiver.url.rsplit(":", 1)[1]
    forms = ["0x7f.1", "0177.0.0.1", "2130706433", "127.1", "[::ffff:7f00:1]"]
    for host in forms:
        run_id = finished_run(engine, clock)
        with engine.begin() as conn:
            url = f"http://{host}:{port}/x"
            conn.execute(update(runs).where(runs.c.id == run_id).values(callback_url=url))
    assert strict.run_once().gave_up == len(forms)
    assert receiver.posts() == []


@pytest.mark.parametrize("url", UNDELIVERABLE)
def test_callback_urls_and_rules_that_can_never_be_delivered_are_refused(
    engine: Engine, url: str
) -> None:
    with pytest.raises(InvalidInput, match=r"^callback_url: .*callbacks are POSTed to it"):
        build_request(name="report", callback_url=url)
    with pytest.raises(InvalidInput, match=r"^url: "):
        notify_rules.add_rule(UnitOfWork(engine), on="failed", url=url, actor="t")
    assert notify_rules.list_rules(UnitOfWork(engine)) == []
