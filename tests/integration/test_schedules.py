"""Guarantee 5 on both databases: each slot recorded once, with its run, whatever the policy."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select

from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, InvalidInput, UnknownTask
from domain.runs import dispatch
from domain.runs import store as runstore
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.schedules.fires import fire_once_each
from domain.tasks.registry import Registry, RegistryCatalog
from scheduler.schedule_runner import ScheduleRunner, slots_for
from scheduler.triggers import Slots, TriggerSpec
from tests.fakes import FakeClock, FakePublisher

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def add(
    engine: Engine, clock: FakeClock, name: str = "every-minute", **fields: object
) -> sched.ScheduleView:
    values: dict[str, object] = {
        "name": name,
        "target": "t",
        "trigger": "cron",
        "expression": "* * * * *",
    }
    values.update(fields)
    spec = sched.ScheduleInput.parse(**values)
    slots = Slots(
        TriggerSpec(spec.trigger, spec.expression, spec.timezone, spec.start_at, spec.end_at)
    )
    return manage.add_schedule(UnitOfWork(engine), spec, slots, now=clock())


def fire_rows(engine: Engine) -> list[tuple[datetime, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(sched.fires.c.fire_at, sched.fires.c.outcome).order_by(sched.fires.c.fire_at)
        )
        return [(r[0], r[1]) for r in rows]


def run_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(runs)).scalar_one())


def test_a_slot_fires_once_even_when_fired_twice(engine: Engine, clock: FakeClock) -> None:
    clock.now = T0
    view = add(engine, clock)
    assert view.next_fire_at == T0 + timedelta(minutes=1)
    slot = T0 + timedelta(minutes=1)
    first = fire_once_each(engine, view.id, [(slot, "enqueue")], now=slot, next_fire_at=None)
    again = fire_once_each(engine, view.id, [(slot, "enqueue")], now=slot, next_fire_at=None)
    assert [f.outcome for f in first] == ["enqueued"]
    assert [f.outcome for f in again] == ["duplicate"]
    assert run_count(engine) == 1
    with engine.connect() as conn:
        run = conn.execute(select(runs)).mappings().one()
    assert (run["triggered_by"], run["trigger_ref"]) == ("schedule", f"schedule:{view.id}")
    assert first[0].dispatch is not None and first[0].dispatch.run_id == run["id"]


def test_concurrent_schedulers_firing_one_slot_make_one_run(
    engine: Engine, clock: FakeClock
) -> None:
    clock.now = T0
    view = add(engine, clock)
    slot = T0 + timedelta(minutes=1)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def scheduler() -> None:
        barrier.wait()
        for f in fire_once_each(engine, view.id, [(slot, "enqueue")], now=slot, next_fire_at=None):
            outcomes.append(f.outcome)

    threads = [threading.Thread(target=scheduler) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["duplicate"] * 3 + ["enqueued"]
    assert run_count(engine) == 1
    assert fire_rows(engine) == [(slot, "enqueued")]


@pytest.mark.parametrize(
    ("misfire", "limit", "expected"),
    [
        ("skip", None, ["skipped_misfire"] * 9),
        ("run_once", None, ["skipped_misfire"] * 8 + ["enqueued"]),
        ("catch_up", 3, ["enqueued"] * 3 + ["skipped_misfire"] * 6),
    ],
)
def test_misfire_policies_after_an_outage(
    engine: Engine, clock: FakeClock, misfire: str, limit: int | None, expected: list[str]
) -> None:
    clock.now = T0
    add(engine, clock, misfire_policy=misfire, catch_up_limit=limit)
    # The scheduler was down for 10.5 minutes: slots 1-9 are past the 60 s grace, slot 10 is not.
    clock.now = T0 + timedelta(minutes=10, seconds=30)
    publisher = FakePublisher()
    runner = ScheduleRunner(engine, publisher, clock=clock, misfire_grace_s=60)
    runner.sync()
    rows = fire_rows(engine)
    assert [r[0] for r in rows] == [T0 + timedelta(minutes=m) for m in range(1, 11)]  # no gap
    assert [r[1] for r in rows] == [*expected, "enqueued"]  # slot 10 still fires, late
    assert run_count(engine) == expected.count("enqueued") + 1
    assert len(publisher.published) == run_count(engine)
    runner.sync()  # nothing changed: nothing is recorded twice
    assert len(fire_rows(engine)) == 10


def test_pause_then_resume_applies_the_policy_to_the_paused_slots(
    engine: Engine, clock: FakeClock
) -> None:
    clock.now = T0
    add(engine, clock, misfire_policy="run_once")
    runner = ScheduleRunner(engine, FakePublisher(), clock=clock, misfire_grace_s=0)
    runner.sync()
    manage.set_enabled(UnitOfWork(engine), "every-minute", False, now=clock())
    clock.now = T0 + timedelta(minutes=5, seconds=1)
    runner.sync()
    assert fire_rows(engine) == []  # paused: nothing fires
    manage.set_enabled(UnitOfWork(engine), "every-minute", True, now=clock())
    runner.sync()
    assert [o for _, o in fire_rows(engine)] == ["skipped_misfire"] * 4 + ["enqueued"]


def test_overlap_skip_and_queue(engine: Engine, clock: FakeClock) -> None:
    clock.now = T0
    skip = add(engine, clock, name="skipper", overlap_policy="skip")
    queue = add(engine, clock, name="queuer", overlap_policy="queue")
    s1, s2 = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    for view in (skip, queue):
        fire_once_each(engine, view.id, [(s1, "enqueue")], now=s1, next_fire_at=None)
    # both first runs are still active when the next slot comes
    skipped = fire_once_each(engine, skip.id, [(s2, "enqueue")], now=s2, next_fire_at=None)
    held = fire_once_each(engine, queue.id, [(s2, "enqueue")], now=s2, next_fire_at=None)
    assert [f.outcome for f in skipped] == ["skipped_overlap"]
    assert [f.outcome for f in held] == ["enqueued"] and held[0].dispatch is None
    with engine.connect() as conn:
        due = {d[0] for d in dispatch.due_for_dispatch(conn, now=s2, grace_s=30)}
    assert held[0].run_id not in due  # held back while the first run is active
    # the first queued run starts and finishes; only then is the held one released
    with engine.begin() as conn:
        first = conn.execute(
            select(runs.c.id).where(
                runs.c.trigger_ref == f"schedule:{queue.id}", runs.c.not_before != sched.HELD
            )
        ).scalar_one()
        runstore.claim(conn, first, owner="w", now=s2, lease_s=30)
    assert sched.release_held(engine, now=s2) == 0
    with engine.begin() as conn:
        runstore.finish(conn, first, 1, status="succeeded", now=s2)
    assert sched.release_held(engine, now=s2) == 1
    with engine.connect() as conn:
        due = {d[0] for d in dispatch.due_for_dispatch(conn, now=s2, grace_s=30)}
    assert held[0].run_id in due


def test_bad_schedules_are_refused_and_nothing_is_saved(engine: Engine, clock: FakeClock) -> None:
    clock.now = T0
    add(engine, clock)
    with pytest.raises(Conflict, match="already exists"):
        add(engine, clock)
    registry = Registry()

    @registry.task()
    def real(ctx, n: int) -> None:  # type: ignore[no-untyped-def]
        pass

    spec = sched.ScheduleInput.parse(
        name="x", target="ghost", trigger="cron", expression="* * * * *"
    )
    with pytest.raises(UnknownTask):
        manage.add_schedule(
            UnitOfWork(engine),
            spec,
            slots_for(_row(spec)),
            now=T0,
            catalog=RegistryCatalog(registry),
        )
    spec = sched.ScheduleInput.parse(
        name="x", target="real", params={"n": "x"}, trigger="cron", expression="* * * * *"
    )
    with pytest.raises(InvalidInput, match=r"params\.n"):
        manage.add_schedule(
            UnitOfWork(engine),
            spec,
            slots_for(_row(spec)),
            now=T0,
            catalog=RegistryCatalog(registry),
        )
    with pytest.raises(InvalidInput, match="in the past"):
        add(engine, clock, name="once", trigger="once", expression="2020-01-01T00:00:00Z")
    with pytest.raises(InvalidInput, match="catch_up needs a limit"):
        add(engine, clock, name="c", misfire_policy="catch_up")
    assert [s.name for s in manage.list_schedules(UnitOfWork(engine))] == ["every-minute"]


def test_declared_schedules_removed_from_code_are_disabled(
    engine: Engine, clock: FakeClock
) -> None:
    clock.now = T0
    add(engine, clock, name="a", source="code")
    add(engine, clock, name="b", source="code")
    add(engine, clock, name="by-hand")
    assert sched.disable_missing(engine, "code", {"a"}, now=T0) == ["b"]
    enabled = {s.name: s.enabled for s in manage.list_schedules(UnitOfWork(engine))}
    assert enabled == {"a": True, "b": False, "by-hand": True}


def _row(spec: sched.ScheduleInput) -> object:
    class Row:
        trigger, expression, timezone = spec.trigger, spec.expression, spec.timezone
        start_at, end_at = spec.start_at, spec.end_at

    return Row()


def test_schedules_declared_in_code_sync_and_disappear(engine: Engine, clock: FakeClock) -> None:
    from domain.tasks.registry import cron, every
    from scheduler.declared import sync_code_schedules

    clock.now = T0
    registry = Registry()

    @registry.task(schedule=cron("*/5 * * * *", tz="Europe/Berlin"))
    def report(ctx) -> None:  # type: ignore[no-untyped-def]
        pass

    @registry.task(schedule=every("30s", params={"n": 1}))
    def ping(ctx, n: int) -> None:  # type: ignore[no-untyped-def]
        pass

    assert sync_code_schedules(engine, registry, clock=clock) == []
    views = {s.name: s for s in manage.list_schedules(UnitOfWork(engine))}
    assert set(views) == {"task:report", "task:ping"}
    assert (views["task:report"].timezone, views["task:ping"].params) == ("Europe/Berlin", {"n": 1})
    stamp = views["task:report"].updated_at
    assert sync_code_schedules(engine, registry, clock=FakeClock(T0 + timedelta(hours=1))) == []
    assert (
        manage.get_schedule(UnitOfWork(engine), "task:report").updated_at == stamp
    )  # unchanged: no write

    smaller = Registry()
    smaller.add(registry.get("ping"))
    assert sync_code_schedules(engine, smaller, clock=clock) == ["task:report"]
    assert manage.get_schedule(UnitOfWork(engine), "task:report").enabled is False


def test_schedules_declared_in_pipeline_json(engine: Engine, clock: FakeClock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from domain.pipelines.discovery import PipelineDirectory
    from scheduler.declared import sync_pipeline_schedules

    clock.now = T0
    for name, config in {
        "nightly": {"schedule_cron": "30 2 * * *", "timezone": "Europe/Berlin"},
        "often": {"schedule_interval_seconds": 90},
        "plain": {},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "main.py").write_text("print('hi')\n")
        (tmp_path / name / "pipeline.json").write_text(json.dumps(config))
    assert sync_pipeline_schedules(engine, PipelineDirectory(tmp_path), clock=clock) == []
    views = {s.name: s for s in manage.list_schedules(UnitOfWork(engine))}
    assert set(views) == {"pipeline:nightly", "pipeline:often"}
    nightly = views["pipeline:nightly"]
    assert (nightly.target_kind, nightly.target_name, nightly.trigger, nightly.timezone) == (
        "pipeline",
        "nightly",
        "cron",
        "Europe/Berlin",
    )
    assert views["pipeline:often"].expression == "90"
    (tmp_path / "often" / "pipeline.json").write_text("{}")  # the key was removed
    assert sync_pipeline_schedules(engine, PipelineDirectory(tmp_path), clock=clock) == [
        "pipeline:often"
    ]
    assert manage.get_schedule(UnitOfWork(engine), "pipeline:often").enabled is False
