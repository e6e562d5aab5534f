"""Guarantee 2: exactly one live attempt. Claims are conditional; later writes are fenced."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import Engine

from domain.db.unit_of_work import UnitOfWork
from domain.errors import LeaseLost
from domain.runs import control, enqueue
from domain.runs import store as runstore
from domain.runs.requests import build_request
from tests.fakes import FakeClock


def pending(uow: UnitOfWork, **fields: object) -> uuid.UUID:
    return enqueue.enqueue(uow, build_request(name="t", **fields)).run.id


def test_claim_bumps_attempt_and_sets_a_lease(
    engine: Engine, uow: UnitOfWork, clock: FakeClock
) -> None:
    run_id = pending(uow, params={"x": 1}, max_attempts=2)
    with engine.begin() as conn:
        claim = runstore.claim(conn, run_id, owner="w1", now=clock(), lease_s=30)
        assert claim is not None
        assert (claim.attempt, claim.params, claim.max_attempts) == (1, {"x": 1}, 2)
        # the same message delivered twice: the second claim is refused
        assert runstore.claim(conn, run_id, owner="w2", now=clock(), lease_s=30) is None
    run = control.get_run(uow, run_id)
    assert run.status == "running" and run.lease_owner == "w1"
    assert run.lease_expires_at is not None
    assert (run.lease_expires_at - clock()).total_seconds() == 30
    assert run.started_at == clock()


def test_expired_lease_is_claimed_again_and_the_old_attempt_is_fenced(
    engine: Engine, uow: UnitOfWork, clock: FakeClock
) -> None:
    run_id = pending(uow, max_attempts=3)
    with engine.begin() as conn:
        assert runstore.claim(conn, run_id, owner="w1", now=clock(), lease_s=30) is not None
        assert runstore.claim(conn, run_id, owner="w2", now=clock.advance(29), lease_s=30) is None
        second = runstore.claim(conn, run_id, owner="w2", now=clock.advance(2), lease_s=30)
        assert second is not None and second.attempt == 2
        # the first worker wakes up: every write it tries is refused
        with pytest.raises(LeaseLost):
            runstore.heartbeat(conn, run_id, 1, now=clock(), lease_s=30)
        with pytest.raises(LeaseLost):
            runstore.finish(conn, run_id, 1, status="succeeded", now=clock(), result={"v": 1})
        runstore.finish(conn, run_id, 2, status="succeeded", now=clock(), result={"v": 2})
        with pytest.raises(LeaseLost):  # terminal states never change again
            runstore.finish(conn, run_id, 2, status="failed", now=clock())
    run = control.get_run(uow, run_id)
    assert (run.status, run.attempt, run.result) == ("succeeded", 2, {"v": 2})
    assert run.lease_owner is None and run.finished_at == clock()


def test_no_claim_past_max_attempts(engine: Engine, uow: UnitOfWork, clock: FakeClock) -> None:
    run_id = pending(uow, max_attempts=1)
    with engine.begin() as conn:
        assert runstore.claim(conn, run_id, owner="w1", now=clock(), lease_s=5) is not None
        assert runstore.claim(conn, run_id, owner="w2", now=clock.advance(60), lease_s=5) is None


def test_retry_later_and_release(engine: Engine, uow: UnitOfWork, clock: FakeClock) -> None:
    run_id = pending(uow, max_attempts=3)
    with engine.begin() as conn:
        runstore.claim(conn, run_id, owner="w1", now=clock(), lease_s=30)
        runstore.retry_later(
            conn,
            run_id,
            1,
            now=clock(),
            not_before=clock.advance(0) + _s(10),
            error_type="ValueError",
            error="boom",
        )
        assert runstore.claim(conn, run_id, owner="w1", now=clock.advance(9), lease_s=30) is None
        claim = runstore.claim(conn, run_id, owner="w1", now=clock.advance(2), lease_s=30)
        assert claim is not None and claim.attempt == 2
        # graceful shutdown gives the run back without spending an attempt
        assert runstore.release(conn, run_id, 2, now=clock()) is True
        again = runstore.claim(conn, run_id, owner="w2", now=clock(), lease_s=30)
        assert again is not None and again.attempt == 2


def test_finish_needs_a_terminal_status(engine: Engine, uow: UnitOfWork, clock: FakeClock) -> None:
    run_id = pending(uow)
    with engine.begin() as conn:
        runstore.claim(conn, run_id, owner="w", now=clock(), lease_s=30)
        with pytest.raises(ValueError, match="terminal status"):
            runstore.finish(conn, run_id, 1, status="running", now=clock())


@pytest.mark.parametrize("_round", range(3))
def test_concurrent_claimers_one_winner(
    engine: Engine, uow: UnitOfWork, clock: FakeClock, _round: int
) -> None:
    run_id = pending(uow)
    barrier = threading.Barrier(6)
    winners: list[int] = []

    def worker(n: int) -> None:
        barrier.wait()
        with engine.begin() as conn:
            if runstore.claim(conn, run_id, owner=f"w{n}", now=clock(), lease_s=30):
                winners.append(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert control.get_run(uow, run_id).attempt == 1


def _s(seconds: float):  # type: ignore[no-untyped-def]
    from datetime import timedelta

    return timedelta(seconds=seconds)
