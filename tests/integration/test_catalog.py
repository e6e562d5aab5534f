"""The task catalog: what workers publish is what every producer checks, with or without the
task's code (issue: a run's retry policy must not depend on what its producer imported)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput, UnknownTask
from domain.runs import enqueue, rows
from domain.runs.delivery_checks import DeliveryCheck
from domain.runs.requests import build_request
from domain.runs.views import RunView
from domain.schedules import manage
from domain.schedules.definitions import HELD
from domain.tasks import catalog
from domain.tasks.catalog import CompositeCatalog, TaskTableCatalog, permissive, task_catalog
from domain.tasks.registry import Registry, RegistryCatalog, every
from domain.webhooks import inbound as webhooks
from tests.fakes import FakeClock

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def tasks() -> Registry:
    registry = Registry()

    @registry.task(name="hello")
    def hello(ctx: Any, name: str = "world") -> None: ...

    @registry.task(name="flaky", max_attempts=3, timeout=20, queue="slow", priority=7)
    def flaky(ctx: Any, customer_id: int, mode: Literal["a", "b"] = "a") -> None: ...

    @registry.task(name="summarize", schedule=every("15m"), on_success="hello")
    def summarize(ctx: Any, docs: list[str], when: datetime | None = None) -> None: ...

    return registry


@pytest.fixture
def published(engine: Engine) -> Registry:
    registry = tasks()
    assert catalog.publish(engine, registry.specs(), owner="w1:1", now=T0) == 3
    return registry


def test_a_worker_publishes_each_task_once_and_rewrites_only_what_changed(
    engine: Engine, published: Registry
) -> None:
    with engine.connect() as conn:
        rows = {r.name: r for r in conn.execute(select(task_catalog))}
    assert sorted(rows) == ["flaky", "hello", "summarize"]
    flaky = rows["flaky"]
    assert flaky.options["max_attempts"] == 3
    assert flaky.options["queue"] == "slow"
    assert flaky.options["retry"] == {"base_s": 2.0, "max_s": 300.0}
    assert flaky.params_schema["required"] == ["customer_id"]
    assert rows["summarize"].options["schedule"]["expression"] == "15m"
    assert rows["summarize"].options["on_success"] == "hello"
    assert flaky.module == __name__

    # The same code again: nothing rewritten, only seen.
    later = T0 + timedelta(minutes=3)
    assert catalog.publish(engine, published.specs(), owner="w2:2", now=later) == 0
    entries = catalog.load(engine)
    assert entries["flaky"].last_seen_at == later
    assert entries["flaky"].registered_by == "w1:1"

    # New code for one task: that row, and only it, is rewritten.
    changed = Registry()

    @changed.task(name="flaky", max_attempts=5)
    def flaky2(ctx: Any, customer_id: int) -> None: ...

    assert catalog.publish(engine, changed.specs(), owner="w3:3", now=later) == 1
    entries = catalog.load(engine)
    assert entries["flaky"].options["max_attempts"] == 5
    assert entries["flaky"].registered_by == "w3:3"
    assert entries["flaky"].version != flaky.version
    assert entries["hello"].version == rows["hello"].version


def test_a_producer_without_the_code_applies_the_task_defaults(
    engine: Engine, published: Registry
) -> None:
    table = TaskTableCatalog(engine)
    defaults, params = table.resolve("flaky", {"customer_id": 7})
    assert (defaults.max_attempts, defaults.queue, defaults.timeout_s, defaults.priority) == (
        3,
        "slow",
        20,
        7,
    )
    assert params == {"customer_id": 7, "mode": "a"}  # the default is stored, as pydantic does
    run = enqueue.enqueue(
        UnitOfWork(engine), build_request(name="flaky", params={"customer_id": 7}), catalog=table
    ).run
    assert (run.max_attempts, run.queue, run.timeout_s, run.priority) == (3, "slow", 20, 7)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "params.customer_id: missing (required)"),
        ({"customer_id": "7"}, 'params.customer_id: "7" is not of type "integer"'),
        ({"customer_id": True}, "params.customer_id: true is not of type"),
        ({"customer_id": 1, "extra": 2}, "params.extra: unknown field"),
        ({"customer_id": 1, "mode": "c"}, 'params.mode: "c" is not one of'),
    ],
)
def test_bad_params_are_refused_the_same_with_and_without_the_code(
    engine: Engine, published: Registry, params: dict[str, Any], message: str
) -> None:
    for resolver in (TaskTableCatalog(engine), RegistryCatalog(published)):
        with pytest.raises(InvalidInput) as info:
            resolver.resolve("flaky", params)
        assert str(info.value).startswith(message), (resolver, str(info.value))


def test_formats_are_checked_where_the_code_is_not(engine: Engine, published: Registry) -> None:
    table = TaskTableCatalog(engine)
    with pytest.raises(
        InvalidInput,
        match=r'params\.when: none of the allowed forms: "yesterday" is not a "date-time"; '
        r'"yesterday" is not of type "null"',
    ):
        table.resolve("summarize", {"docs": [], "when": "yesterday"})
    _, params = table.resolve("summarize", {"docs": ["a"], "when": "2026-12-01T10:00:00Z"})
    assert params["when"] == "2026-12-01T10:00:00Z"


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "customer_id": JSON | st.integers(),
        "mode": JSON | st.sampled_from(["a", "b"]),
        "other": JSON,
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(params=PARAMS)
def test_with_or_without_the_code_the_same_params_pass_and_are_stored_alike(
    sqlite_url: str, params: dict[str, Any]
) -> None:
    from domain.db.engine import create_db_engine

    registry = tasks()
    engine = create_db_engine(sqlite_url)
    try:
        catalog.publish(engine, registry.specs(), owner="w", now=T0)
        outcomes = []
        for resolver in (TaskTableCatalog(engine), RegistryCatalog(registry)):
            try:
                outcomes.append(resolver.resolve("flaky", dict(params))[1])
            except InvalidInput as exc:
                outcomes.append(("refused", str(exc).split(":")[0]))
        assert outcomes[0] == outcomes[1]
    finally:
        engine.dispose()


def test_an_unknown_name_lists_the_names_that_exist_closest_first(
    engine: Engine, published: Registry
) -> None:
    producer = CompositeCatalog(TaskTableCatalog(engine))
    with pytest.raises(UnknownTask) as info:
        producer.resolve("helo", {})
    message = str(info.value)
    assert message.startswith("no task or pipeline named 'helo'; did you mean 'hello'?")
    assert "(known: hello, flaky, summarize;" in message


def test_allow_unknown_accepts_an_unpublished_name_but_still_checks_known_ones(
    engine: Engine, published: Registry
) -> None:
    loose = permissive(CompositeCatalog(TaskTableCatalog(engine)))
    defaults, params = loose.resolve("not_yet_deployed", {"anything": 1})
    assert (defaults.max_attempts, params) == (None, {"anything": 1})
    with pytest.raises(InvalidInput):
        loose.resolve("flaky", {"customer_id": "x"})


def test_a_task_published_after_the_catalog_was_read_is_found(engine: Engine) -> None:
    now = [0.0]
    table = TaskTableCatalog(engine, ttl_s=60, miss_s=0.5, monotonic=lambda: now[0])
    with pytest.raises(UnknownTask):
        table.resolve("hello", {})
    catalog.publish(engine, tasks().specs(), owner="w", now=T0)
    now[0] = 1.0  # past miss_s, long before ttl_s: a miss looks again
    assert table.resolve("hello", {})[1] == {"name": "world"}


def test_webhook_targets_are_checked_against_the_catalog(
    engine: Engine, published: Registry
) -> None:
    producer = CompositeCatalog(TaskTableCatalog(engine))
    with pytest.raises(UnknownTask, match="did you mean 'hello'"):
        webhooks.add_webhook(
            UnitOfWork(engine),
            "greet",
            target="helo",
            secret_key=_key(),
            actor="t",
            catalog=producer,
        )
    view, _ = webhooks.add_webhook(
        UnitOfWork(engine), "greet", target="flaky", secret_key=_key(), actor="t", catalog=producer
    )
    assert view.target_name == "flaky"  # a task with required params is known all the same


def _key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _run(name: str, queue: str) -> RunView:
    return enqueue._view(
        rows.run_row(
            build_request(name=name, queue=queue), permissive(CompositeCatalog()), T0, False
        )
    )


def test_warnings_say_when_no_worker_will_take_the_run(
    engine: Engine, published: Registry, clock: FakeClock
) -> None:
    from domain.db.models import workers

    check = DeliveryCheck(engine, ttl_s=0)
    quiet = check.warnings(_run("hello", "default"), T0)
    assert quiet == ["no live worker consumes queue 'default': the run waits until one does "
                     "(conveyor worker -Q default)"]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            workers.insert().values(
                id="h:1", hostname="h", pid=1, queues={"names": ["default", "celery"]},
                started_at=T0, heartbeat_at=T0, running=0, stopped=False,
            )
        )  # fmt: skip
    assert check.warnings(_run("hello", "default"), T0) == []
    ghost = check.warnings(_run("ghost", "default"), T0)
    assert ghost == ["no worker has published task 'ghost': the run waits for a worker whose "
                     "CONVEYOR_TASK_MODULES has it"]  # fmt: skip
    later = T0 + timedelta(minutes=20)  # no heartbeat since, and no catalog refresh
    both = check.warnings(_run("hello", "default"), later)
    assert both[0] == "no worker has served task 'hello' for 20m (last: w1:1)"
    assert both[1].startswith("no live worker consumes queue 'default'")


def test_a_schedule_naming_a_misspelled_task_is_refused_when_added(
    engine: Engine, published: Registry
) -> None:
    from domain.schedules import definitions as sched
    from scheduler.triggers import Slots, TriggerSpec

    producer = CompositeCatalog(TaskTableCatalog(engine))
    slots = Slots(TriggerSpec("interval", "1m", "UTC"))

    def add(target: str, name: str) -> None:
        spec = sched.ScheduleInput.parse(
            name=name, target=target, trigger="interval", expression="1m"
        )
        manage.add_schedule(UnitOfWork(engine), spec, slots, now=T0, catalog=producer)

    with pytest.raises(UnknownTask, match="did you mean 'hello'"):
        add("helo", "greet")
    assert manage.list_schedules(UnitOfWork(engine)) == []
    add("hello", "greet")
    assert [s.target_name for s in manage.list_schedules(UnitOfWork(engine))] == ["hello"]


def test_a_pending_run_s_reason_names_what_it_waits_for(
    engine: Engine, published: Registry
) -> None:
    check = DeliveryCheck(engine)
    reason = check.pending_reason(_run("hello", "mail"), T0)
    assert reason == (
        "no live worker consumes queue 'mail': the run waits until one does "
        "(conveyor worker -Q mail)"
    )
    held = dataclasses.replace(_run("hello", "mail"), not_before=HELD)
    assert check.pending_reason(held, T0).startswith("it is held until the run it waits for ends")
