"""Deliveries accepted together (domain/webhooks/batches.py): each one gets the answer it would
get alone, and the ones that pass share one transaction."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from cryptography.fernet import Fernet
from sqlalchemy import Engine, func, select

from domain.clock import utc_now
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict
from domain.runs.enqueue import Enqueued
from domain.webhooks import inbound as webhooks
from domain.webhooks.batches import Delivery, accept_batch
from domain.webhooks.inbound import BadSignature, MalformedPayload, StaleTimestamp, WebhookNotFound

KEY = Fernet.generate_key().decode()


def delivery(secret: str, delivery_id: str, body: object, *, hook: str = "deploy") -> Delivery:
    raw = json.dumps(body).encode()
    stamp = str(int(time.time()))
    return Delivery(hook, stamp, delivery_id, webhooks.signature(secret, stamp, raw), raw)


def accept(engine: Engine, batch: list[Delivery]) -> list[object]:
    uow: Callable[[], UnitOfWork] = lambda: UnitOfWork(engine)  # noqa: E731
    return list(accept_batch(uow, batch, secret_key=KEY, now=utc_now(), tolerance_s=300))


def count(engine: Engine, table: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def add_hook(engine: Engine, name: str = "deploy") -> str:
    _, secret = webhooks.add_webhook(
        UnitOfWork(engine), name, target="build", secret_key=KEY, actor="test"
    )
    return secret


def test_each_delivery_of_a_batch_gets_its_own_answer(engine: Engine) -> None:
    secret = add_hook(engine)
    good = delivery(secret, "d-1", {"ref": "a"})
    unsigned = Delivery("deploy", good.timestamp, "d-2", "sha256=00", good.body)
    stale = Delivery("deploy", "1000", "d-3", good.signature, good.body)
    not_json = Delivery(
        "deploy", good.timestamp, "d-4", webhooks.signature(secret, good.timestamp, b"[1"), b"[1"
    )
    outcomes = accept(
        engine,
        [
            good,
            unsigned,
            delivery(secret, "d-5", {"ref": "b"}, hook="nope"),
            stale,
            not_json,
            delivery(secret, "d-6", {"ref": "c"}),
            good,  # the same delivery twice in one batch: one run, the second a repeat
        ],
    )
    first, bad_sig, unknown, too_old, malformed, other, repeat = outcomes
    assert isinstance(first, Enqueued) and first.created
    assert isinstance(bad_sig, BadSignature)
    assert isinstance(unknown, WebhookNotFound)
    assert isinstance(too_old, StaleTimestamp)
    assert isinstance(malformed, MalformedPayload)
    assert isinstance(other, Enqueued) and other.created and other.run.params == {"ref": "c"}
    assert isinstance(repeat, Enqueued) and not repeat.created and repeat.run.id == first.run.id
    assert count(engine, runs) == 2
    assert count(engine, webhooks.deliveries) == 2

    again = accept(engine, [delivery(secret, "d-1", {"ref": "a"})])[0]
    assert isinstance(again, Enqueued) and not again.created and again.run.id == first.run.id


def test_a_reused_delivery_id_fails_alone_and_the_rest_of_its_batch_is_accepted(
    engine: Engine,
) -> None:
    secret = add_hook(engine)
    earlier = accept(engine, [delivery(secret, "d-1", {"ref": "a"})])[0]
    assert isinstance(earlier, Enqueued)
    outcomes = accept(
        engine,
        [
            delivery(secret, "d-2", {"ref": "b"}),
            delivery(secret, "d-1", {"ref": "DIFFERENT"}),  # the batch's transaction fails
            delivery(secret, "d-3", {"ref": "c"}),
        ],
    )
    before, reused, after = outcomes
    assert isinstance(reused, Conflict) and "d-1" in str(reused)
    assert isinstance(before, Enqueued) and before.created
    assert isinstance(after, Enqueued) and after.created
    assert count(engine, runs) == 3
    assert count(engine, webhooks.deliveries) == 3
