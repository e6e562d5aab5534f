"""Without a leading scheduler, retries, delayed runs, chains and lost-worker recovery wait:
workers say so once a minute, from the leader's heartbeat row, until one leads again."""

from __future__ import annotations

from sqlalchemy import Engine
from structlog.testing import capture_logs

from domain.schedules.leader import absence, beat, last_beat
from tests.fakes import FakeClock
from worker.scheduler_watch import SchedulerWatch


def warnings(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e["event"] == "worker.no_scheduler"]


def test_a_worker_warns_each_minute_while_no_scheduler_leads(engine: Engine) -> None:
    clock = FakeClock()
    watch = SchedulerWatch(engine, silence_s=30, clock=clock, warn_every_s=60)
    with capture_logs() as events:
        assert watch.check() is None  # just started: a scheduler may be starting too
        clock.advance(29)
        assert watch.check() is None
        clock.advance(2)
        problem = watch.check()
        assert problem is not None and "none seen yet" in problem
        assert "`conveyor scheduler`" in problem
        clock.advance(10)
        assert watch.check() == problem.replace("31 s", "41 s")  # still absent ...
        assert len(warnings(events)) == 1  # ... but said once a minute, not each check
        clock.advance(50)
        watch.check()
        assert len(warnings(events)) == 2
        beat(engine, now=clock())  # a scheduler leads
        clock.advance(5)
        assert watch.check() is None
        assert len(warnings(events)) == 2
        clock.advance(31)  # and is gone again: said at once, not a minute after the last
        again = watch.check()
        assert again is not None and "last seen" in again
        assert len(warnings(events)) == 3


def test_the_heartbeat_is_one_row_that_moves(engine: Engine) -> None:
    clock = FakeClock()
    assert last_beat(engine) is None
    beat(engine, now=clock())
    assert last_beat(engine) == clock()
    beat(engine, now=clock.advance(5))
    assert last_beat(engine) == clock()
    # an old beat counts from the caller's own start when that is later
    later = clock.advance(3600)
    assert absence(engine, now=later, since=later, silence_s=30) is None
    assert absence(engine, now=clock.advance(31), since=later, silence_s=30) is not None
