"""Many schedules due at one instant are recorded in one transaction; the guarantees of one
slot at a time still hold: exactly once against another scheduler, overlap inside a batch,
and a slot that cannot be made does not take the batch down with it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, delete, func, select

from domain.db.engine import create_db_engine
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.schedules import definitions as sched
from domain.schedules import manage
from domain.schedules.fires import Due, Fired, RequestCache, advance_cursors, fire_many
from domain.tasks.registry import Registry, RegistryCatalog
from scheduler.schedule_runner import ScheduleRunner
from scheduler.triggers import Slots, TriggerSpec
from tests.fakes import FakePublisher, PreparingPublisher
from tests.polling import eventually

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EVERY_SECOND = Slots(TriggerSpec("interval", "1s"))


def add_many(engine: Engine, count: int, *, now: datetime = T0, **fields: object) -> list[int]:
    ids = []
    for k in range(count):
        values: dict[str, object] = {
            "name": f"s{k}",
            "target": "t",
            "params": {"k": k},
            "trigger": "interval",
            "expression": "1s",
        }
        values.update(fields)
        view = manage.add_schedule(
            UnitOfWork(engine), sched.ScheduleInput.parse(**values), EVERY_SECOND, now=now
        )
        ids.append(view.id)
    return ids


def recorded(engine: Engine) -> list[tuple[int, datetime, str, object]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                sched.fires.c.schedule_id,
                sched.fires.c.fire_at,
                sched.fires.c.outcome,
                sched.fires.c.run_id,
            ).order_by(sched.fires.c.schedule_id, sched.fires.c.fire_at)
        )
        return [(r[0], r[1].replace(tzinfo=UTC), r[2], r[3]) for r in rows]


def scheduled_runs(engine: Engine) -> dict[object, str]:
    """run id -> trigger_ref, for every run a schedule made."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(runs.c.id, runs.c.trigger_ref).where(runs.c.triggered_by == "schedule")
        )
        return {r[0]: r[1] for r in rows}


def run_until(runner: ScheduleRunner, done: Callable[[], bool], timeout: float = 30) -> None:
    """Let the runner fire until `done()` holds (failing after `timeout`), then stop it."""
    runner.start()
    try:
        eventually(done, timeout, every=0.05, what="the runner's fires")
    finally:
        runner.stop()


def every_slot(ids: list[int], slot: datetime) -> list[Due]:
    return [Due(i, [(slot, "enqueue")], slot + timedelta(seconds=1)) for i in ids]


def test_one_batch_records_every_schedule_with_its_run(engine: Engine) -> None:
    ids = add_many(engine, 30)
    slot = T0 + timedelta(seconds=1)
    dues = every_slot(ids, slot)
    fired = fire_many(engine, dues, now=slot)
    assert sorted(f.schedule_id for f in fired if f.outcome == "enqueued") == ids
    assert all(f.dispatch is not None and f.dispatch.run_id == f.run_id for f in fired)
    rows = recorded(engine)
    assert [(r[0], r[1], r[2]) for r in rows] == [(i, slot, "enqueued") for i in ids]
    made = scheduled_runs(engine)
    assert {made[r[3]] for r in rows} == {f"schedule:{i}" for i in ids}  # its own run each
    assert len(made) == 30
    assert {v.last_fire_at for v in manage.list_schedules(UnitOfWork(engine))} == {
        None
    }  # not yet moved
    advance_cursors(engine, dues, fired)
    views = {v.id: v for v in manage.list_schedules(UnitOfWork(engine))}
    assert {(views[i].last_fire_at, views[i].next_fire_at) for i in ids} == {
        (slot, slot + timedelta(seconds=1))
    }


def test_slots_recorded_elsewhere_are_duplicates_and_the_rest_still_fire(engine: Engine) -> None:
    """A frozen leader wakes up and fires an instant the new leader already fired for some
    schedules: those come back duplicate with nothing of ours kept, the others are recorded."""
    ids = add_many(engine, 10)
    slot = T0 + timedelta(seconds=1)
    first = fire_many(engine, every_slot(ids[:4], slot), now=slot)
    # and one slot whose run was deleted since (retention), only its fire row is left
    with engine.begin() as conn:
        conn.execute(delete(runs).where(runs.c.id == first[0].run_id))
    again = fire_many(engine, every_slot(ids, slot), now=slot)
    outcomes = {f.schedule_id: f.outcome for f in again}
    assert outcomes == {i: "duplicate" if i in ids[:4] else "enqueued" for i in ids}
    assert all(f.dispatch is None for f in again if f.outcome == "duplicate")
    rows = recorded(engine)
    assert [(r[0], r[1]) for r in rows] == [(i, slot) for i in ids]  # once each
    made = scheduled_runs(engine)
    assert len(made) == 9  # 3 from the first batch, 6 from the second: no stray run
    assert {r[3] for r in rows if r[0] in ids[4:]} <= set(made)


def test_two_schedulers_firing_overlapping_batches_record_each_slot_once(
    engine: Engine,
) -> None:
    ids = add_many(engine, 12)
    slots = [T0 + timedelta(seconds=s) for s in (1, 2, 3)]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def scheduler(part: list[int]) -> None:
        try:
            barrier.wait()
            for slot in slots:
                fire_many(engine, every_slot(part, slot), now=slot)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    parts = [ids, ids[:8], ids[4:], ids[::2]]
    threads = [threading.Thread(target=scheduler, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = recorded(engine)
    assert [(r[0], r[1]) for r in rows] == [(i, s) for i in ids for s in slots]
    assert {r[2] for r in rows} == {"enqueued"}
    made = scheduled_runs(engine)
    assert len(made) == len(rows) == len({r[3] for r in rows})


def test_overlap_inside_one_batch(engine: Engine) -> None:
    """catch_up slots of one schedule in one batch: the first run is still active when the
    next slot is recorded, so skip skips it and queue holds it."""
    (skip,) = add_many(engine, 1, overlap_policy="skip")
    (queue,) = add_many(engine, 1, name="q", overlap_policy="queue")
    (allow,) = add_many(engine, 1, name="a")
    missed = [(T0 + timedelta(seconds=s), "enqueue") for s in (1, 2, 3)]
    nxt = T0 + timedelta(seconds=4)
    fired = fire_many(engine, [Due(i, missed, nxt) for i in (skip, queue, allow)], now=nxt)
    by = {i: [f.outcome for f in fired if f.schedule_id == i] for i in (skip, queue, allow)}
    assert by == {
        skip: ["enqueued", "skipped_overlap", "skipped_overlap"],
        queue: ["enqueued"] * 3,
        allow: ["enqueued"] * 3,
    }
    with engine.connect() as conn:
        held = conn.execute(
            select(func.count())
            .select_from(runs)
            .where(runs.c.trigger_ref == f"schedule:{queue}", runs.c.not_before == sched.HELD)
        ).scalar_one()
    assert held == 2


def test_a_slot_that_cannot_be_made_leaves_the_batch_alone(engine: Engine) -> None:
    registry = Registry()

    @registry.task()
    def t(ctx, k: int) -> None:  # type: ignore[no-untyped-def]
        pass

    ids = add_many(engine, 3)
    (ghost,) = add_many(engine, 1, name="ghost", target="ghost")  # its task is gone now
    slot = T0 + timedelta(seconds=1)
    dues = every_slot([*ids, ghost], slot)
    fired = fire_many(engine, dues, now=slot, catalog=RegistryCatalog(registry))
    advance_cursors(engine, dues, fired)
    outcomes = {f.schedule_id: f.outcome for f in fired}
    assert outcomes == {ids[0]: "enqueued", ids[1]: "enqueued", ids[2]: "enqueued", ghost: "failed"}
    assert "ghost" in next(f.error or "" for f in fired if f.outcome == "failed")
    assert sorted(r[0] for r in recorded(engine)) == ids  # the failed slot is not recorded
    # and its cursor stays put, so a restart sees that slot as missed
    assert manage.get_schedule(UnitOfWork(engine), "ghost").last_fire_at is None
    assert manage.get_schedule(UnitOfWork(engine), "s0").last_fire_at == slot


def test_paused_schedules_in_a_batch_record_nothing(engine: Engine) -> None:
    ids = add_many(engine, 3)
    manage.set_enabled(UnitOfWork(engine), "s1", False, now=T0)
    slot = T0 + timedelta(seconds=1)
    fired = fire_many(engine, every_slot(ids, slot), now=slot)
    assert sorted(f.schedule_id for f in fired) == [ids[0], ids[2]]
    assert [r[0] for r in recorded(engine)] == [ids[0], ids[2]]


def test_the_runner_fires_schedules_due_together_in_one_batch(engine: Engine) -> None:
    """Real time and a real APScheduler: five one-second schedules share every instant, so
    each instant is one publish carrying all five runs."""
    now = datetime.now(UTC)
    ids = add_many(engine, 5, now=now)
    publisher = FakePublisher()
    run_until(
        ScheduleRunner(engine, publisher, misfire_grace_s=60), lambda: len(publisher.batches) >= 3
    )
    assert len(publisher.batches) >= 3
    assert {len(b) for b in publisher.batches} == {5}
    rows = recorded(engine)
    by_slot: dict[datetime, set[int]] = {}
    for schedule_id, slot, _, _ in rows:
        by_slot.setdefault(slot, set()).add(schedule_id)
    assert all(members == set(ids) for members in by_slot.values())
    assert len(rows) == len(scheduled_runs(engine))


def test_an_edited_schedule_fires_with_its_new_params(engine: Engine) -> None:
    """Requests are cached per schedule version: an edit is seen by the very next fire."""
    (only,) = add_many(engine, 1)
    cache = RequestCache()
    s1, s2 = T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)
    first = fire_many(engine, every_slot([only], s1), now=s1, requests=cache)
    spec = sched.ScheduleInput.parse(
        name="s0", target="t", params={"k": 99}, trigger="interval", expression="1s"
    )
    manage.add_schedule(
        UnitOfWork(engine), spec, EVERY_SECOND, now=s1 + timedelta(milliseconds=1), replace=True
    )
    second = fire_many(engine, every_slot([only], s2), now=s2, requests=cache)
    with engine.connect() as conn:
        params = dict(conn.execute(select(runs.c.id, runs.c.params)).all())
    assert (params[first[0].run_id], params[second[0].run_id]) == ({"k": 0}, {"k": 99})


def test_a_staged_batch_is_invisible_until_its_commit(engine: Engine) -> None:
    """With before_commit the rows are written first and committed after it returns; a
    schedule whose overlap policy depends on the slot's moment is deferred, not recorded."""
    ids = add_many(engine, 3)
    (guarded,) = add_many(engine, 1, name="guarded", overlap_policy="skip")
    slot = T0 + timedelta(seconds=1)
    seen_before: list[int] = []
    staged: list[tuple[int | None, str]] = []

    def at_the_slot(fired: list[Fired]) -> None:
        staged.extend((f.schedule_id, f.outcome) for f in fired)
        if engine.dialect.name == "sqlite":  # one writer: another connection would wait
            return
        with engine.connect() as other:
            seen_before.append(
                other.execute(select(func.count()).select_from(sched.fires)).scalar_one()
            )

    fired = fire_many(
        engine, every_slot([*ids, guarded], slot), now=slot, before_commit=at_the_slot
    )
    if engine.dialect.name == "postgresql":
        assert seen_before == [0]
    assert sorted(staged) == [(i, "enqueued") for i in ids]  # what the commit will record
    assert {f.schedule_id: f.outcome for f in fired} == {
        ids[0]: "enqueued",
        ids[1]: "enqueued",
        ids[2]: "enqueued",
        guarded: "deferred",
    }
    assert sorted(r[0] for r in recorded(engine)) == ids
    with engine.connect() as conn:
        created = set(conn.execute(select(runs.c.created_at)).scalars())
    assert {c.replace(tzinfo=UTC) for c in created} == {slot}


def test_the_runner_fires_guarded_schedules_at_their_slot(engine: Engine) -> None:
    """On PostgreSQL instants are staged, and an overlap-`skip` schedule is fired once its
    slot has come: its first run is still pending (nothing consumes here), so every later
    slot is skipped, while the `allow` schedules beside it enqueue every time."""
    now = datetime.now(UTC)
    allow = add_many(engine, 2, now=now)
    (skip,) = add_many(engine, 1, name="skipper", now=now, overlap_policy="skip")
    run_until(
        ScheduleRunner(engine, FakePublisher(), misfire_grace_s=60),
        lambda: sum(1 for r in recorded(engine) if r[0] == skip) >= 3,
    )
    outcomes: dict[int, list[str]] = {}
    for schedule_id, _, outcome, _ in recorded(engine):
        outcomes.setdefault(schedule_id, []).append(outcome)
    assert len(outcomes[skip]) >= 3
    assert outcomes[skip] == ["enqueued"] + ["skipped_overlap"] * (len(outcomes[skip]) - 1)
    assert {o for i in allow for o in outcomes[i]} == {"enqueued"}


@pytest.mark.postgres  # staging is PostgreSQL's: SQLite's single writer cannot wait in a write
def test_a_staged_instant_builds_its_messages_before_the_slot_and_sends_them_after(
    pg_url: str,
) -> None:
    engine = create_db_engine(pg_url)
    now = datetime.now(UTC)
    add_many(engine, 5, now=now)
    publisher = PreparingPublisher(engine)
    try:
        run_until(
            ScheduleRunner(engine, publisher, misfire_grace_s=60), lambda: len(publisher.seen) >= 2
        )
    finally:
        engine.dispose()
    assert publisher.seen[:2] == [("prepare", 5, 0), ("send", 5, 5)]
