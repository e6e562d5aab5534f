"""What conveyor's execute messages show Celery's tools: the run's task name as `shadow`, the
run id and its masked, bounded params as `argsrepr`/`kwargsrepr`, on both publishing paths (the
templated Redis messages and kombu's own), while the body still holds only the run id."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
import redis

from domain.ports import Dispatch
from domain.security.masking import Masker
from domain.settings import load_settings
from worker.app import create_app
from worker.messages import REPR_MAX_CHARS
from worker.publisher import CeleryPublisher
from worker.routing import EXECUTE

PARAMS = {"to": "ops@example.com", "api_key": "sk-live-0123456789", "note": 'say "hi" 100%'}
SHOWN = "{'to': 'ops@example.com', 'api_key': '***', 'note': 'say \"hi\" 100%'}"


def published_on_redis(redis_url: str, dispatch: Dispatch, masker: Masker | None = None) -> Any:
    """The one message `dispatch` became, as the worker's transport pops it from Redis."""
    client = redis.Redis.from_url(redis_url)
    app = create_app(load_settings(broker_url=redis_url))
    publisher = CeleryPublisher(app) if masker is None else CeleryPublisher(app, masker=masker)
    publisher.publish([dispatch])
    [key] = client.keys(f"{dispatch.queue}*")
    [raw] = client.lrange(key, 0, -1)
    client.delete(key)
    client.close()
    # A publisher lives as long as its process and has no close(); the test shuts its client.
    assert publisher._redis is not None
    publisher._redis.close()
    return raw.decode()


@pytest.mark.redis
def test_the_redis_message_shows_the_task_name_and_masked_params(redis_url: str) -> None:
    run_id = uuid.uuid4()
    raw = published_on_redis(redis_url, Dispatch(run_id, "send_report", "hdr-q", 5, PARAMS))
    assert "sk-live-0123456789" not in raw
    message = json.loads(raw)
    headers = message["headers"]
    assert headers["task"] == EXECUTE  # what the worker runs
    assert headers["shadow"] == "send_report"  # what Flower, logs and events show
    assert headers["argsrepr"] == repr([str(run_id)])
    assert headers["kwargsrepr"] == SHOWN
    assert json.loads(message["body"])[:2] == [[str(run_id)], {}]


def test_kombu_publishing_sets_the_same_headers() -> None:
    """Brokers other than Redis publish through send_task: the same three headers."""
    app = create_app(load_settings(broker_url="memory://"))
    run_id = uuid.uuid4()
    CeleryPublisher(app).publish([Dispatch(run_id, "send_report", "hdr-kombu", 5, PARAMS)])
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("hdr-kombu")
        message = queue.get(timeout=5)
        message.ack()
        queue.close()
    assert message.headers["task"] == EXECUTE
    assert message.headers["shadow"] == "send_report"
    assert message.headers["argsrepr"] == repr([str(run_id)])
    assert message.headers["kwargsrepr"] == SHOWN
    assert message.decode()[:2] == [[str(run_id)], {}]


@pytest.mark.redis
def test_a_known_secret_value_is_masked_in_every_form(redis_url: str) -> None:
    secret = "hunter2-Ω-secret"
    params = {"url": f"https://u:{secret}@db.example", "raw": base64.b64encode(secret.encode())}
    params["raw"] = params["raw"].decode()
    raw = published_on_redis(
        redis_url, Dispatch(uuid.uuid4(), "sync", "hdr-q", 5, params), Masker([secret])
    )
    kwargsrepr = json.loads(raw)["headers"]["kwargsrepr"]
    assert kwargsrepr == "{'url': 'https://u:***@db.example', 'raw': '***'}"
    assert "hunter2" not in raw and params["raw"] not in raw


@pytest.mark.redis
def test_shown_params_are_bounded_and_no_params_show_as_empty(redis_url: str) -> None:
    big = Dispatch(uuid.uuid4(), "big", "hdr-q", 5, {"blob": "x" * 50_000})
    shown = json.loads(published_on_redis(redis_url, big))["headers"]["kwargsrepr"]
    assert len(shown) <= REPR_MAX_CHARS and shown.startswith("{'blob': 'xxx") and shown[-1] == "…"
    bare = Dispatch(uuid.uuid4(), "bare", "hdr-q", 5)
    assert json.loads(published_on_redis(redis_url, bare))["headers"]["kwargsrepr"] == "{}"
