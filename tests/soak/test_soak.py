"""The fault soak (issue 16): a private PostgreSQL and Redis, real workers and two schedulers,
a stream of mixed runs, schedules firing every second and a pipeline using a secret, while
faults land on a timeline (tests/soak/faults.py); then, once the system has settled, every
invariant of tests/soak/invariants.py must hold.

`CONVEYOR_SOAK_SECONDS` sets how long the load lasts (default 90: about three minutes in all);
the faults repeat every 90 s of it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from conveyor import Client
from domain.clock import utc_now
from domain.costs.ledger import MonthlyLimitReached
from domain.costs.projects import add_project
from domain.db.engine import create_db_engine
from domain.db.migrate import upgrade
from domain.db.models import dead_letters, runs
from domain.db.unit_of_work import UnitOfWork
from domain.runs.states import TERMINAL
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.security.secrets import SecretStore
from scheduler.triggers import Slots, TriggerSpec
from tests.e2e.stack import ROOT, Stack
from tests.polling import eventually
from tests.services import PrivatePostgres, PrivateRedis
from tests.soak import invariants
from tests.soak.faults import Faults

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

SECONDS = float(os.environ.get("CONVEYOR_SOAK_SECONDS", "90"))
RUNS_PER_S = 12  # planned runs a second of load, besides schedules, submits and pipelines
TICK_S = 0.5
SECRET = "soak-secret-9d41c2e8b7"
PROJECT = "soak-budget"
LIMIT_USD = Decimal("0.30")  # 30 spends of 0.01: reached well before the spenders run out
#: The mix, by weight: mostly short runs, a few of every other kind.
MIX = [
    ("soak_short", 10),
    ("soak_logs", 3),
    ("soak_flaky", 2),
    ("soak_fails", 1),
    ("soak_long", 1),
    ("soak_spend", 1),
]
KINDS = [name for name, weight in MIX for _ in range(weight)]


@pytest.fixture
def soak(tmp_path: Path) -> Iterator[Faults]:
    """The private services and the processes; everything ended and removed at the end."""
    postgres = PrivatePostgres()
    redis = PrivateRedis(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    faults = None
    try:
        postgres.start()
        upgrade(postgres.url())
        redis.start()
        pipelines = tmp_path / "pipelines"
        shutil.copytree(ROOT / "pipelines" / "with_secret", pipelines / "with_secret")
        config = pipelines / "with_secret" / "pipeline.json"
        config.write_text(config.read_text().replace('"timeout"', '"retry_attempts": 7, "timeout"'))
        key = Fernet.generate_key().decode()
        (tmp_path / "marks").mkdir()
        (tmp_path / "logs").mkdir()
        stack = Stack(
            postgres.url(),
            tmp_path / "logs",
            redis.url(0),
            CONVEYOR_TASK_MODULES="tests.soak.soak_tasks",
            CONVEYOR_PIPELINES_DIR=str(pipelines),
            CONVEYOR_PIPELINE_CACHE_DIR=str(tmp_path / "envs"),
            CONVEYOR_ARTIFACTS_ROOT=str(tmp_path / "artifacts"),
            CONVEYOR_SECRET_KEY=key,
            CONVEYOR_SCHEDULE_MISFIRE_GRACE_S="2",
            CONVEYOR_SHUTDOWN_GRACE_S="2",
            CONVEYOR_BROKER_VISIBILITY_TIMEOUT_S="5",
        )
        stack.env["SOAK_MARKS_DIR"] = str(tmp_path / "marks")
        engine = create_db_engine(postgres.url())
        SecretStore(engine, key).set("API_TOKEN", SECRET)  # before the workers check the key
        add_project(UnitOfWork(engine), PROJECT, monthly_cost_usd=str(LIMIT_USD), now=utc_now())
        faults = Faults(stack, postgres, redis, engine)
        yield faults
    finally:
        try:
            if faults is not None:
                faults.close()
                faults.engine.dispose()
        finally:
            redis.close()
            postgres.close()


def planned_items(n: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The n-th planned run onwards: (idempotency key, enqueue fields), kinds in a fixed mix."""
    for i in itertools.count(n):
        name = KINDS[i % len(KINDS)]
        fields: dict[str, Any] = {"name": name, "idempotency_key": f"soak:{i}"}
        if name in {"soak_short", "soak_logs"}:
            fields["params"] = {"i": i}
        elif name == "soak_long":
            fields["params"] = {"seconds": 1 + i % 8}
        elif name == "soak_spend":
            fields["project"] = PROJECT
        yield fields["idempotency_key"], fields


class Load:
    """Enqueues the planned runs a tick at a time; a batch the database refused is tried again
    at the next tick (its idempotency keys make a batch that did commit a no-op)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.planned: dict[str, str] = {}
        self.refused: set[str] = set()  # spenders refused at enqueue: the project is at its limit
        self.backlog: list[tuple[str, dict[str, Any]]] = []
        self.items = planned_items(0)
        self.error: Exception | None = None  # why the last batch was not written

    def tick(self, count: int) -> bool:
        """Enqueue `count` more planned runs and the backlog; True while a backlog remains."""
        self.backlog += [next(self.items) for _ in range(count)]
        spend = [(k, f) for k, f in self.backlog if f["name"] == "soak_spend"]
        rest = [(k, f) for k, f in self.backlog if f["name"] != "soak_spend"]
        self.backlog = []
        for batch in (rest, spend):
            if not batch:
                continue
            try:
                self.client.enqueue_many(f for _, f in batch)
            except MonthlyLimitReached:
                self.refused.update(k for k, _ in batch)
            except Exception as exc:  # an outage: the batch waits for the next tick
                self.error = exc
                self.backlog += batch
            else:
                self.planned.update((k, f["name"]) for k, f in batch)
        return bool(self.backlog)


def every_second(engine: Any, name: str, **fields: Any) -> sched.ScheduleView:
    spec = sched.ScheduleInput.parse(
        name=name, target="soak_short", trigger="interval", expression="1s", **fields
    )
    return manage.add_schedule(
        UnitOfWork(engine), spec, Slots(TriggerSpec("interval", "1s")), now=utc_now()
    )


def unfinished(engine: Any) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(runs.c.status.not_in(list(TERMINAL)))
            ).scalar_one()
        )


def drive(soak: Faults, load: Load, plain: Celery) -> list[str]:
    """The load and the faults, a tick at a time for SECONDS; returns the keys of the plain
    Celery submits sent while PostgreSQL was down."""
    submits = []
    actions = soak.timeline(SECONDS)
    start = time.monotonic()
    for tick in itertools.count():
        now = time.monotonic() - start
        if now >= SECONDS:
            break
        while actions and actions[0].at <= now:
            action = actions.pop(0)
            action.run()
            if action.fault:
                soak.injected.append(action.fault)
        if not soak.postgres_down:
            if tick % 10 == 0:
                key = f"soak:pipeline:{tick}"
                load.backlog.append((key, {"name": "with_secret", "idempotency_key": key}))
            load.tick(int(RUNS_PER_S * TICK_S))
        else:  # plain Celery clients submit meanwhile: each becomes one run once it is back
            key = f"soak:submit:{tick}"
            plain.send_task(
                "conveyor.submit", kwargs={"name": "soak_short", "idempotency_key": key}
            )
            submits.append(key)
        time.sleep(max(0.0, start + (tick + 1) * TICK_S - time.monotonic()))
    soak.thaw()  # a fault the load's end cut short is ended all the same
    if soak.postgres_down:
        soak.start_postgres()
    try:
        eventually(lambda: not load.tick(0), timeout=60, every=TICK_S)  # the last batches
    except AssertionError:
        raise AssertionError(f"planned runs never enqueued: {load.error!r}") from None
    return submits


def settle(soak: Faults, views: list[sched.ScheduleView]) -> datetime:
    """Pause the schedules and wait for every run to end; returns when they were paused. A
    run that never ends is left for the invariant checker to report."""
    for view in views:
        manage.set_enabled(UnitOfWork(soak.engine), view.name, False, now=utc_now())
    paused_at = datetime.now(UTC)
    time.sleep(1.5)  # a slot staged before the pause still fires
    with contextlib.suppress(AssertionError):
        eventually(lambda: unfinished(soak.engine) == 0, timeout=180, every=1)
        eventually(lambda: _letters(soak.engine) >= len(soak.poisons), timeout=60, every=1)
    return paused_at


def test_soak(soak: Faults, capsys: pytest.CaptureFixture[str]) -> None:
    began = time.monotonic()
    engine, stack = soak.engine, soak.stack
    soak.schedulers += [stack.scheduler(), stack.scheduler()]
    soak.start_worker()
    soak.start_worker()
    with stack.client() as client:
        assert client.wait(client.enqueue("soak_short").id, timeout=90).status == "succeeded"
        eventually(lambda: soak.leader() is not None, timeout=30)
        views = [
            every_second(engine, "soak-skip"),
            every_second(engine, "soak-catch-up", misfire_policy="catch_up", catch_up_limit=3),
        ]
        load = Load(client)
        submits = drive(soak, load, Celery(broker=stack.broker_url))
        load.planned.update((k, "soak_short") for k in submits)
        paused_at = settle(soak, views)
    soak.close()

    facts = invariants.Facts(
        engine=engine,
        postgres=soak.postgres,
        marks=Path(stack.env["SOAK_MARKS_DIR"]),
        planned={k: n for k, n in load.planned.items() if k not in load.refused},
        killed_groups=soak.killed_groups,
        unrecordable=invariants.finish_failed(stack.logs),
        poisons=soak.poisons,
        schedules=views,
        paused_at=paused_at,
        project=PROJECT,
        limit_usd=LIMIT_USD,
        secret=SECRET,
    )
    results = invariants.check(facts)
    held = sum(not problems for problems in results.values())
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(runs)).scalar_one()
    with capsys.disabled():
        print(
            f"\nsoak: {total} runs, {len(soak.injected)} faults, {held}/{len(results)} invariants "
            f"held in {time.monotonic() - began:.0f} s"
        )
    broken = {name: problems[:5] for name, problems in results.items() if problems}
    assert not broken, broken


def _letters(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(dead_letters)).scalar_one())
