"""The `greeting` pipeline of ./pipelines started twice: by a signed webhook delivery (sent twice,
run once) and by an interval schedule."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from api.app import create_api
from conveyor import Client
from domain.clock import utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.schedules import definitions as schedules
from domain.schedules import manage
from domain.webhooks.inbound import add_webhook, signature
from scheduler.triggers import Slots, TriggerSpec


def deliver(client: Client, secret_key: str, *, name: str = "greet") -> list[dict[str, Any]]:
    """Create a webhook for the pipeline and POST one signed delivery twice."""
    _, secret = add_webhook(
        UnitOfWork(client.engine),
        name,
        target="greeting",
        kind="pipeline",
        secret_key=secret_key,
        actor="example",
    )
    app = create_api(
        client.settings,
        engine=client.engine,
        publisher=client.publisher,
        secret_key=secret_key,
        auth_disabled=True,
    )
    body = json.dumps({"name": "from a webhook"}).encode()
    stamp = str(int(time.time()))
    headers = {
        "X-Conveyor-Signature": signature(secret, stamp, body),
        "X-Conveyor-Timestamp": stamp,
        "X-Conveyor-Delivery": "delivery-1",
        "Content-Type": "application/json",
    }

    async def post_twice() -> list[dict[str, Any]]:
        # The app's lifespan, as uvicorn would run it: it starts the API and its webhook intake.
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
            async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as http:
                answers = []
                for _ in range(2):
                    reply = await http.post(f"/hooks/{name}", content=body, headers=headers)
                    answers.append({"status": reply.status_code, **reply.json()})
                return answers

    return asyncio.run(post_twice())


def every_second(client: Client, *, name: str = "greeting-every-second") -> Any:
    spec = schedules.ScheduleInput.parse(
        name=name,
        target="greeting",
        target_kind="pipeline",
        params={"name": "from a schedule"},
        trigger="interval",
        expression="1s",
    )
    return manage.add_schedule(
        UnitOfWork(client.engine), spec, Slots(TriggerSpec("interval", "1s")), now=utc_now()
    )
