"""Guarantee 5 with real processes: two schedulers, the leader killed, a restart: every
one-second slot recorded exactly once, no gap, one run per enqueued slot."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from domain.clock import utc_now
from domain.db.engine import create_db_engine
from domain.db.unit_of_work import UnitOfWork
from domain.schedules import definitions as sched
from domain.schedules import manage
from scheduler.leader import ADVISORY_KEY
from scheduler.triggers import Slots, TriggerSpec
from tests.e2e.stack import Stack
from tests.polling import consistently, eventually
from tests.schedule_slots import assert_every_slot_once, fires_and_runs
from tests.services import PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def scheduler_stack(
    pg_url: str, redis_server: PrivateRedis, tmp_path: Path
) -> Iterator[tuple[Stack, Engine]]:
    """Scheduler processes to start (all stopped at the end) and an engine on their database."""
    with _stack(pg_url, redis_server, tmp_path) as made:
        yield made


@contextlib.contextmanager
def _stack(
    pg_url: str, redis_server: PrivateRedis, tmp_path: Path, **overrides: str
) -> Iterator[tuple[Stack, Engine]]:
    stack = Stack(pg_url, tmp_path, redis_server.url(4), **overrides)
    stack.redis.flushdb()
    engine = create_db_engine(pg_url)
    try:
        yield stack, engine
    finally:
        stack.stop_all()
        engine.dispose()


def test_leader_killed_and_restarted_no_duplicate_no_gap(
    scheduler_stack: tuple[Stack, Engine],
) -> None:
    stack, engine = scheduler_stack
    view = _every_second(engine, "tick")
    leader = stack.scheduler()
    eventually(lambda: _count(engine, view.id) >= 2, timeout=30)
    standby = stack.scheduler()
    eventually(lambda: _a_standby_waits(engine), timeout=30, what="the standby trying the lock")
    stack.kill(leader, signal.SIGKILL)  # mid-stream: the standby must take over
    before = _count(engine, view.id)
    eventually(lambda: _count(engine, view.id) >= before + 3, timeout=30)
    stack.kill(standby, signal.SIGTERM)  # a restart across fire times
    stopped_at = _count(engine, view.id)
    # The length of the outage is the point (slots come due while no scheduler runs), and
    # with none running nothing may be recorded.
    consistently(
        lambda: _count(engine, view.id) == stopped_at, 2.5, what="no fire while none leads"
    )
    stack.scheduler()
    after_restart = _count(engine, view.id)
    eventually(lambda: _count(engine, view.id) >= after_restart + 4, timeout=30)
    _pause_and_check_every_slot_once(engine, stack, view)


def test_a_frozen_leader_cannot_double_fire_when_it_wakes(
    scheduler_stack: tuple[Stack, Engine],
) -> None:
    """SIGSTOP the leader (on PostgreSQL it spends half of every second inside a staged
    transaction holding its schedules' locks): the standby takes over once PostgreSQL has
    ended the frozen sessions, and after SIGCONT the old leader's writes change nothing."""
    stack, engine = scheduler_stack
    views = [_every_second(engine, name) for name in ("tick-a", "tick-b", "tick-c")]
    first = views[0].id
    leader = stack.scheduler()
    eventually(lambda: _count(engine, first) >= 2, timeout=30)
    standby = stack.scheduler()
    eventually(lambda: _a_standby_waits(engine), timeout=30, what="the standby trying the lock")
    _sleep_until_before(0.3, every_s=1)  # frozen inside the staged transaction of a slot
    os.killpg(leader.pid, signal.SIGSTOP)
    frozen_at = _count(engine, first)
    eventually(lambda: _count(engine, first) >= frozen_at + 3, timeout=40)  # standby leads
    os.killpg(leader.pid, signal.SIGCONT)
    # the old leader wakes up, finds its sessions gone, and stands by
    eventually(lambda: _a_standby_waits(engine), timeout=30, what="the old leader standing by")
    resumed_at = _count(engine, first)
    eventually(lambda: _count(engine, first) >= resumed_at + 2, timeout=30)
    _pause(engine, views)
    stack.kill(standby, signal.SIGTERM)
    stack.kill(leader, signal.SIGTERM)

    for view in views:
        slots, made = fires_and_runs(engine, view.id)
        times = [s[0] for s in slots]
        steps = {b - a for a, b in itertools.pairwise(times)}
        assert steps == {timedelta(seconds=1)}, f"{view.name}: a gap or a repeat"
        enqueued = [s for s in slots if s[1] == "enqueued"]
        assert made == len(enqueued) == len({s[2] for s in enqueued})  # one run each


def test_a_leader_that_loses_its_database_connection_hands_over(
    scheduler_stack: tuple[Stack, Engine],
) -> None:
    """The leader's session (and with it the advisory lock) is ended by the server: it stops
    firing, a scheduler leads again within a few seconds, and every slot is still recorded
    once with one run."""
    stack, engine = scheduler_stack
    view = _every_second(engine, "tick")
    stack.scheduler()
    eventually(lambda: _count(engine, view.id) >= 2, timeout=30)
    stack.scheduler()
    eventually(lambda: _a_standby_waits(engine), timeout=30, what="the standby trying the lock")
    holder = _lock_holder(engine)
    assert holder is not None
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": holder})
    eventually(lambda: _lock_holder(engine) not in (None, holder), timeout=15)
    cut_at = _count(engine, view.id)
    eventually(lambda: _count(engine, view.id) >= cut_at + 3, timeout=30)
    _pause_and_check_every_slot_once(engine, stack, view)


def _pause_and_check_every_slot_once(engine: Engine, stack: Stack, view: Any) -> None:
    """Pause the schedule, stop the schedulers, and check its slots: one a second with no gap
    and no repeat, each enqueued (late slots were within the grace) with a run of its own."""
    _pause(engine, [view])
    stack.stop_all()
    slots, made = fires_and_runs(engine, view.id)
    times = [s[0] for s in slots]
    gaps = [b - a for a, b in itertools.pairwise(times) if b - a != timedelta(seconds=1)]
    assert gaps == [], f"slots not contiguous: {gaps}"
    assert len(set(times)) == len(times)
    assert {s[1] for s in slots} == {"enqueued"}
    assert made == len(slots) == len({s[2] for s in slots})  # one run per slot, never two


def _every_second(engine: Engine, name: str, **fields: Any) -> sched.ScheduleView:
    return _add(engine, name, "interval", "1s", **fields)


def _add(
    engine: Engine, name: str, trigger: str, expression: str, **fields: Any
) -> sched.ScheduleView:
    """Added as the API and the CLI add it (the leader hears of it by NOTIFY)."""
    spec = sched.ScheduleInput.parse(
        name=name, target="noop", trigger=trigger, expression=expression, **fields
    )
    slots = Slots(TriggerSpec(trigger, expression))
    return manage.add_schedule(UnitOfWork(engine), spec, slots, now=utc_now())


def _lock_holder(engine: Engine) -> int | None:
    """The backend pid holding the schedulers' advisory lock in this test's database, if any
    (another suite's schedulers on the same server hold the same key in their own)."""
    with engine.connect() as conn:
        pid = conn.execute(
            text(
                "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database() "
                "AND l.objid = (CAST(:k AS bigint) & 4294967295)"
            ),
            {"k": ADVISORY_KEY},
        ).scalar()
        return int(pid) if pid is not None else None


def _a_standby_waits(engine: Engine) -> bool:
    """A scheduler not leading has tried the advisory lock: its session's last statement is
    that try, and it is not the session holding the lock."""
    holder = _lock_holder(engine)
    with engine.connect() as conn:
        pids = conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'SELECT pg_try_advisory_lock(%'"
            )
        ).scalars()
        return any(pid != holder for pid in pids)


def _listening(engine: Engine) -> bool:
    """The leader listens for schedule edits (its LISTEN session is in the database)."""
    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query ILIKE 'LISTEN %'"
            )
        ).scalar_one()
        return bool(found)


def _count(engine: Engine, schedule_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(sched.fires)
                .where(sched.fires.c.schedule_id == schedule_id)
            ).scalar_one()
        )


def test_edits_take_effect_without_a_restart(scheduler_stack: tuple[Stack, Engine]) -> None:
    """Added, paused, resumed and removed while the scheduler runs: each within ~2 s."""
    stack, engine = scheduler_stack
    stack.scheduler()
    eventually(lambda: _listening(engine), timeout=30, what="the leader listening for edits")
    spec = sched.ScheduleInput.parse(
        name="late", target="noop", trigger="interval", expression="1s"
    )
    view = manage.add_schedule(
        UnitOfWork(engine), spec, Slots(TriggerSpec("interval", "1s")), now=utc_now()
    )
    eventually(lambda: _count(engine, view.id) >= 1, timeout=5)  # added: fires
    _pause(engine, [view], hold_s=2)  # paused: no new slot
    manage.remove_schedule(UnitOfWork(engine), "late")


def test_schedules_added_in_the_half_second_before_an_instant_fire_every_slot(
    scheduler_stack: tuple[Stack, Engine],
) -> None:
    """The leader stages each instant half a second ahead. Schedules added inside that half
    second, due at that very instant (one-second intervals, and a five-second cron whose
    slots are the running schedule's too), fire from their first slot on, with no gap."""
    stack, engine = scheduler_stack
    tick = _every_second(engine, "tick")
    stack.scheduler()
    eventually(lambda: _count(engine, tick.id) >= 2, timeout=30)
    added = []
    for k, ahead in enumerate((0.4, 0.3, 0.2, 0.1)):
        _sleep_until_before(ahead, every_s=1)
        added.append(_every_second(engine, f"late-{k}"))
    _sleep_until_before(0.3, every_s=5)
    cron = _add(engine, "five-seconds", "cron", "*/5 * * * * *")
    eventually(
        lambda: _count(engine, cron.id) >= 3 and all(_count(engine, v.id) >= 3 for v in added),
        timeout=60,
    )
    views = [tick, *added, cron]
    _pause_all(engine, stack, views)
    for view in views:
        outcomes = assert_every_slot_once(engine, view)
        assert set(outcomes) == {"enqueued"}, view.name


def test_a_leader_frozen_below_the_lock_timeout_keeps_every_slot(
    pg_url: str, redis_server: PrivateRedis, tmp_path: Path
) -> None:
    """SIGSTOP the only scheduler for 8 s, less than the lock's 10 s: it still leads when it
    wakes, and every slot is recorded once, those missed beyond the grace (2 s here) by each
    schedule's misfire policy (skip, run_once, catch_up:2), all of them after on time."""
    with _stack(pg_url, redis_server, tmp_path, CONVEYOR_SCHEDULE_MISFIRE_GRACE_S="2") as made:
        stack, engine = made
        leader = stack.scheduler()
        eventually(lambda: _lock_holder(engine) is not None, timeout=30)
        # added once it leads: a slow start-up must not turn the first slots into misfires
        skip = _every_second(engine, "tick-skip")
        once = _every_second(engine, "tick-once", misfire_policy="run_once")
        catch = _every_second(engine, "tick-catch", misfire_policy="catch_up", catch_up_limit=2)
        views = [skip, once, catch]
        eventually(lambda: all(_count(engine, v.id) >= 3 for v in views), timeout=30)
        holder = _lock_holder(engine)
        os.killpg(leader.pid, signal.SIGSTOP)
        time.sleep(8)  # the freeze's length is what is tested: under the lock's 10 s
        os.killpg(leader.pid, signal.SIGCONT)
        resumed = {v.id: _count(engine, v.id) for v in views}
        eventually(lambda: all(_on_time_again(engine, v.id, resumed[v.id]) for v in views), 40)
        assert _lock_holder(engine) == holder  # the same session led throughout
        _pause_all(engine, stack, views)
        outcomes = {v.name: assert_every_slot_once(engine, v) for v in views}
        skipped = {v.name: _slots_with(engine, v, "skipped_misfire") for v in views}
    missed = skipped["tick-skip"]
    assert len(missed) >= 3, outcomes  # 8 s frozen, 2 s of grace
    assert skipped["tick-once"] == missed[:-1]  # the last missed slot runs
    assert skipped["tick-catch"] == missed[2:]  # the first two missed slots run
    for name, seen in outcomes.items():
        assert set(seen) == {"enqueued", "skipped_misfire"}, name
        assert seen[-5:] == ["enqueued"] * 5, name  # on time again after the freeze


def _on_time_again(engine: Engine, schedule_id: int, recorded_before: int) -> bool:
    """Five slots or more recorded since, the last five of them enqueued."""
    slots, _ = fires_and_runs(engine, schedule_id)
    last = [s[1] for s in slots[-5:]]
    return len(slots) >= recorded_before + 5 and last == ["enqueued"] * 5


def _sleep_until_before(ahead_s: float, *, every_s: int) -> None:
    """Sleep until `ahead_s` before the next multiple of `every_s` seconds (UTC): one-second
    intervals fire on whole seconds, a `*/5` second cron on every fifth. A sleep on purpose:
    where in the second something happens is what the callers test, not how long it takes."""
    now = time.time()
    target = (int(now // every_s) + 1) * every_s - ahead_s
    if target <= now:
        target += every_s
    time.sleep(target - now)


def _pause_all(engine: Engine, stack: Stack, views: list[Any]) -> None:
    _pause(engine, views)
    stack.stop_all()


def _pause(engine: Engine, views: list[Any], *, hold_s: float = 1.0) -> None:
    """Pause the schedules and check that they fire nothing more for `hold_s` (one instant's
    staging at least). A fire locks its schedules' rows from staging to commit, so a pause
    waits for a slot staged before it: once the pause has returned, the counts are final."""
    for view in views:
        manage.set_enabled(UnitOfWork(engine), view.name, False, now=utc_now())
    paused_at = {v.id: _count(engine, v.id) for v in views}
    consistently(
        lambda: {v.id: _count(engine, v.id) for v in views} == paused_at,
        hold_s,
        what="paused schedules firing nothing",
    )


def _slots_with(engine: Engine, view: Any, outcome: str) -> list[Any]:
    slots, _ = fires_and_runs(engine, view.id)
    return [s[0] for s in slots if s[1] == outcome]
