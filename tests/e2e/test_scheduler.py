"""Guarantee 5 with real processes: two schedulers, the leader killed, a restart: every
one-second slot recorded exactly once, no gap, one run per enqueued slot."""

from __future__ import annotations

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

from domain import schedules as sched
from domain.clock import utc_now
from domain.db import create_db_engine
from domain.models import runs
from scheduler.leader import ADVISORY_KEY
from scheduler.triggers import Slots, TriggerSpec
from tests.e2e.stack import Stack
from tests.polling import eventually
from tests.services import PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def scheduler_stack(
    pg_url: str, redis_server: PrivateRedis, tmp_path: Path
) -> Iterator[tuple[Stack, Engine]]:
    """Scheduler processes to start (all stopped at the end) and an engine on their database."""
    stack = Stack(pg_url, tmp_path, redis_server.url(4))
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
    time.sleep(1.5)
    stack.kill(leader, signal.SIGKILL)  # mid-stream: the standby must take over
    before = _count(engine, view.id)
    eventually(lambda: _count(engine, view.id) >= before + 3, timeout=30)
    stack.kill(standby, signal.SIGTERM)  # a restart across fire times
    time.sleep(2.5)
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
    time.sleep(1.3)
    os.killpg(leader.pid, signal.SIGSTOP)
    frozen_at = _count(engine, first)
    eventually(lambda: _count(engine, first) >= frozen_at + 3, timeout=40)  # standby leads
    os.killpg(leader.pid, signal.SIGCONT)
    time.sleep(3)  # the old leader wakes up, finds its sessions gone, and stands by
    resumed_at = _count(engine, first)
    eventually(lambda: _count(engine, first) >= resumed_at + 2, timeout=30)
    for view in views:
        sched.set_enabled(engine, view.name, False, now=utc_now())
    time.sleep(1.5)
    stack.kill(standby, signal.SIGTERM)
    stack.kill(leader, signal.SIGTERM)

    for view in views:
        slots, made = _fires_and_runs(engine, view.id)
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
    time.sleep(1.5)
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
    sched.set_enabled(engine, view.name, False, now=utc_now())
    time.sleep(1.5)
    stack.stop_all()
    slots, made = _fires_and_runs(engine, view.id)
    times = [s[0] for s in slots]
    gaps = [b - a for a, b in itertools.pairwise(times) if b - a != timedelta(seconds=1)]
    assert gaps == [], f"slots not contiguous: {gaps}"
    assert len(set(times)) == len(times)
    assert {s[1] for s in slots} == {"enqueued"}
    assert made == len(slots) == len({s[2] for s in slots})  # one run per slot, never two


def _every_second(engine: Engine, name: str) -> sched.ScheduleView:
    spec = sched.ScheduleInput.parse(name=name, target="noop", trigger="interval", expression="1s")
    return sched.add_schedule(engine, spec, Slots(TriggerSpec("interval", "1s")), now=utc_now())


def _fires_and_runs(engine: Engine, schedule_id: int) -> tuple[list[Any], int]:
    """The schedule's recorded slots (fire_at, outcome, run_id) in order, and its runs."""
    with engine.connect() as conn:
        slots = conn.execute(
            select(sched.fires.c.fire_at, sched.fires.c.outcome, sched.fires.c.run_id)
            .where(sched.fires.c.schedule_id == schedule_id)
            .order_by(sched.fires.c.fire_at)
        ).all()
        made = conn.execute(
            select(func.count())
            .select_from(runs)
            .where(runs.c.trigger_ref == f"schedule:{schedule_id}")
        ).scalar_one()
    return list(slots), int(made)


def _lock_holder(engine: Engine) -> int | None:
    """The backend pid holding the schedulers' advisory lock, if any."""
    with engine.connect() as conn:
        pid = conn.execute(
            text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND objid = (CAST(:k AS bigint) & 4294967295)"
            ),
            {"k": ADVISORY_KEY},
        ).scalar()
        return int(pid) if pid is not None else None


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
    time.sleep(2)  # leading, with nothing to fire
    spec = sched.ScheduleInput.parse(
        name="late", target="noop", trigger="interval", expression="1s"
    )
    view = sched.add_schedule(engine, spec, Slots(TriggerSpec("interval", "1s")), now=utc_now())
    eventually(lambda: _count(engine, view.id) >= 1, timeout=5)  # added: fires
    sched.set_enabled(engine, "late", False, now=utc_now())
    time.sleep(2.5)  # the pause reaches the scheduler within ~1 s
    paused_at = _count(engine, view.id)
    time.sleep(2)
    assert _count(engine, view.id) == paused_at  # paused: no new slot
    sched.remove_schedule(engine, "late")
