"""Rate limits on a real database (both): takes within the last 61 seconds, the wait they
report, settling estimates, runs that wait at their claim for room, ctx.acquire's waits, and
bad definitions refused before anything is written."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from domain.clock import utc_now
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ConfigurationError, InvalidInput
from domain.flow import manage, rates
from domain.flow.rates import RateLimit
from domain.runs import control
from domain.tasks.registry import Registry
from tests.integration.conftest import Harness
from tests.polling import eventually

T0 = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _define(engine: Engine, name: str, rpm: int | None = None, tpm: int | None = None) -> None:
    with engine.begin() as conn:
        rates.save(conn, RateLimit(name, rpm, tpm), defined_in="api", now=utc_now())


def _take(engine: Engine, name: str, when: datetime, **ask: int) -> rates.Taken:
    with engine.begin() as conn:
        return rates.take(conn, name, now=when, **ask)


def _row(engine: Engine, run_id: uuid.UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()


@pytest.fixture(autouse=True)
def no_code_limits() -> Iterator[None]:
    rates.forget_code_definitions()
    yield
    rates.forget_code_definitions()


def test_requests_are_granted_up_to_the_limit_in_any_61_seconds(engine: Engine) -> None:
    _define(engine, "api", rpm=3)
    granted = [_take(engine, "api", at(s)).granted for s in (0, 10, 20, 30)]
    assert granted == [True, True, True, False]
    refused = _take(engine, "api", at(30.5))
    # The first request (second 0) leaves the window after second 60: 61 - 30.5 from now.
    assert not refused.granted and refused.wait_s == pytest.approx(30.5)
    assert not _take(engine, "api", at(60.9)).granted  # second 60 still counts second 0
    assert _take(engine, "api", at(61.0)).granted
    assert refused.limit == RateLimit("api", 3, None)


def test_tokens_wait_until_enough_of_the_window_has_passed(engine: Engine) -> None:
    _define(engine, "llm", tpm=1_000)
    assert _take(engine, "llm", at(0), tokens=400, requests=0).granted
    assert _take(engine, "llm", at(10), tokens=400, requests=0).granted
    # 800 used: 500 more needs 300 freed, which only the first bucket's expiry (at 61) gives.
    refused = _take(engine, "llm", at(20), tokens=500)
    assert not refused.granted and refused.wait_s == pytest.approx(41)
    # 700 more needs 500 freed: both buckets, the second leaves at 71.
    assert _take(engine, "llm", at(20), tokens=700).wait_s == pytest.approx(51)
    never = _take(engine, "llm", at(20), tokens=1_001)
    assert not never.granted and never.wait_s == -1
    assert _take(engine, "llm", at(61), tokens=500).granted


def test_a_grant_prunes_what_left_the_window(engine: Engine) -> None:
    _define(engine, "api", rpm=100)
    for s in (0, 1, 2, 62):
        assert _take(engine, "api", at(s)).granted
    with engine.connect() as conn:
        seconds = sorted(conn.execute(select(rates.usage.c.second)).scalars())
    assert seconds == [int(at(2).timestamp()), int(at(62).timestamp())]


def test_settle_gives_back_an_overestimate_and_charges_an_underestimate(engine: Engine) -> None:
    _define(engine, "llm", tpm=1_000)
    first = _take(engine, "llm", at(0), tokens=800)
    assert not _take(engine, "llm", at(1), tokens=500).granted
    with engine.begin() as conn:
        rates.settle(conn, "llm", first.second, tokens=-600)  # it used 200
    assert _take(engine, "llm", at(1), tokens=500).granted  # 200 + 500
    with engine.begin() as conn:
        rates.settle(conn, "llm", first.second, tokens=-10_000)  # never below zero
        rates.settle(conn, "llm", first.second, tokens=250, now=at(2))  # charged now
    with engine.connect() as conn:
        buckets = dict(conn.execute(select(rates.usage.c.second, rates.usage.c.tokens)).all())
    assert buckets == {
        int(at(0).timestamp()): 0,
        int(at(1).timestamp()): 500,
        int(at(2).timestamp()): 250,
    }
    with engine.connect() as conn:
        (shown,) = manage.usage_of(conn, now=at(2))
    assert (shown.tokens_used, shown.tokens_left, shown.requests_left) == (750, 250, None)


def test_takes_at_once_from_many_threads_never_exceed_the_limit(engine: Engine) -> None:
    _define(engine, "api", rpm=40)
    results: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(15):
            for attempt in range(20):  # SQLite: a writer may find the file busy; ask again
                try:
                    got = _take(engine, "api", at(5)).granted
                    break
                except Exception:
                    if attempt == 19:
                        raise
                    time.sleep(0.05)
            with lock:
                results.append(got)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 90 and results.count(True) == 40
    with engine.connect() as conn:
        assert conn.execute(select(func.sum(rates.usage.c.requests))).scalar_one() == 40


@pytest.mark.parametrize(
    ("ask", "field", "says"),
    [
        ({"requests_per_minute": -5}, "requests_per_minute", "1 to"),
        ({"requests_per_minute": 0}, "requests_per_minute", "1 to"),
        ({"tokens_per_minute": 10**16}, "tokens_per_minute", "1 to"),
        ({"requests_per_minute": True}, "requests_per_minute", "whole number"),
        ({"tokens_per_minute": 1.5}, "tokens_per_minute", "whole number"),
        ({}, "requests_per_minute", "give requests_per_minute"),
    ],
)
def test_bad_definitions_are_configuration_errors(
    ask: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(ConfigurationError, match=says) as raised:
        rates.define("openai", **ask)
    assert raised.value.field == field
    assert rates.defined_in_code() == []


def test_a_name_is_defined_once_in_code_and_bad_names_are_refused() -> None:
    rates.define("openai", requests_per_minute=500)
    rates.define("openai", requests_per_minute=500)  # the same again: fine
    with pytest.raises(ConfigurationError, match="already defined"):
        rates.define("openai", requests_per_minute=50)
    with pytest.raises(ConfigurationError, match="rate limit name"):
        rates.define("open ai!", requests_per_minute=5)
    registry = Registry()
    with pytest.raises(ConfigurationError, match="task 'call': rate_limit"):
        registry.task(name="call", rate_limit="no spaces please")(lambda ctx: None)
    with pytest.raises(ConfigurationError, match="rate_limit"):
        registry.task(name="call2", rate_limit=5)(lambda ctx: None)  # type: ignore[arg-type]


def test_a_worker_writes_code_limits_but_keeps_what_an_operator_set(engine: Engine) -> None:
    rates.define("openai", requests_per_minute=500, tokens_per_minute=200_000)
    rates.define("anthropic", requests_per_minute=50)
    _define(engine, "anthropic", rpm=10)  # an operator lowered it
    with engine.begin() as conn:
        assert rates.sync(conn, now=utc_now()) == ["openai"]
        assert rates.sync(conn, now=utc_now()) == []  # unchanged: nothing written
        assert rates.get(conn, "openai") == RateLimit("openai", 500, 200_000)
        assert rates.get(conn, "anthropic") == RateLimit("anthropic", 10, None)


def test_enqueue_of_a_task_naming_an_undefined_limit_is_refused_and_writes_nothing(
    h: Harness,
) -> None:
    @h.registry.task(rate_limit="nowhere")
    def call(ctx: Any) -> None:
        return None

    _define(h.engine, "elsewhere", rpm=5)
    with pytest.raises(InvalidInput, match="no rate limit named 'nowhere'") as raised:
        h.enqueue("call")
    assert raised.value.field == "rate_limit" and "defined: elsewhere" in str(raised.value)
    with h.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(runs)).scalar_one() == 0


def test_a_run_with_no_room_waits_without_a_worker_and_says_for_what(h: Harness) -> None:
    @h.registry.task(rate_limit="slow-api")
    def call(ctx: Any, n: int) -> int:
        return n

    _define(h.engine, "slow-api", rpm=1)
    first, second = h.enqueue("call", params={"n": 1}), h.enqueue("call", params={"n": 2})
    assert h.run(first) == "succeeded"
    before = utc_now()
    assert h.run(second) == "waiting"
    row = _row(h.engine, second)
    assert (row["status"], row["wait_reason"], row["attempt"]) == ("waiting", "rate:slow-api", 1)
    assert row["lease_owner"] is None and row["started_at"] is None
    # It looks again once the first run's request has left the window: ~61 s on.
    assert before + timedelta(seconds=55) < row["not_before"] < before + timedelta(seconds=63)
    assert h.get(second).wait_reason == "rate:slow-api"
    with h.engine.connect() as conn:
        (shown,) = manage.usage_of(conn)
    assert (shown.requests_used, shown.requests_left, shown.waiting) == (1, 0, 1)

    with h.engine.begin() as conn:  # a minute later, the relay delivers it again
        conn.execute(rates.usage.delete())
        conn.execute(runs.update().where(runs.c.id == second).values(not_before=utc_now()))
    assert h.run(second) == "succeeded"
    assert _row(h.engine, second)["attempt"] == 1  # it went on with the attempt it waited in


def test_a_limit_removed_while_runs_name_it_lets_them_start(h: Harness) -> None:
    @h.registry.task(rate_limit="gone")
    def call(ctx: Any) -> str:
        return "ran"

    _define(h.engine, "gone", rpm=1)
    run_id = h.enqueue("call")
    with h.engine.begin() as conn:
        assert rates.remove(conn, "gone")
        assert not rates.remove(conn, "gone")
    assert h.run(run_id) == "succeeded"


def test_acquire_takes_settles_with_cost_and_explains_what_never_fits(h: Harness) -> None:
    seen: dict[str, Any] = {}

    @h.registry.task()
    def agent(ctx: Any) -> None:
        grant = ctx.acquire("llm", tokens=600)
        seen["grant"] = (grant.tokens, grant.requests)
        ctx.cost("openai", "gpt-x", tokens_in=100, tokens_out=50, usd="0")
        seen["settled"] = grant.settled
        try:
            ctx.acquire("llm", tokens=5_000)
        except InvalidInput as exc:
            seen["never"] = str(exc)
        try:
            ctx.acquire("nope")
        except InvalidInput as exc:
            seen["unknown"] = str(exc)

    _define(h.engine, "llm", rpm=10, tpm=1_000)
    assert h.run(h.enqueue("agent")) == "succeeded"
    assert seen["grant"] == (600, 1) and seen["settled"] is True
    assert "can never fit" in seen["never"] and "no rate limit named 'nope'" in seen["unknown"]
    with h.engine.connect() as conn:
        (shown,) = manage.usage_of(conn)
    assert (shown.requests_used, shown.tokens_used) == (1, 150)  # the estimate settled to 150


def test_acquire_waits_visibly_and_gives_up_at_its_timeout(h: Harness) -> None:
    @h.registry.task()
    def agent(ctx: Any) -> None:
        ctx.acquire("busy", timeout="1500ms")

    _define(h.engine, "busy", rpm=1)
    assert _take(h.engine, "busy", utc_now()).granted  # someone else took the minute
    run_id = h.enqueue("agent")
    thread = threading.Thread(target=h.run, args=(run_id,), daemon=True)
    started = time.monotonic()
    thread.start()
    eventually(lambda: _row(h.engine, run_id)["wait_reason"] == "rate:busy", timeout=5)
    assert _row(h.engine, run_id)["status"] == "running"
    thread.join(10)
    assert 1.4 < time.monotonic() - started < 8
    row = _row(h.engine, run_id)
    assert (row["status"], row["error_type"], row["wait_reason"]) == (
        "failed",
        "WaitTimeout",
        None,
    )
    assert "no room for 1 requests" in row["error"]


def test_a_cancel_ends_an_acquire_that_waits(h: Harness) -> None:
    @h.registry.task()
    def agent(ctx: Any) -> None:
        ctx.acquire("busy", timeout="10m")

    _define(h.engine, "busy", rpm=1)
    assert _take(h.engine, "busy", utc_now()).granted
    run_id = h.enqueue("agent")
    thread = threading.Thread(target=h.run, args=(run_id,), daemon=True)
    thread.start()
    eventually(lambda: _row(h.engine, run_id)["wait_reason"] == "rate:busy", timeout=5)
    control.cancel_run(UnitOfWork(h.engine), run_id, actor="test")
    thread.join(15)
    assert not thread.is_alive()
    assert _row(h.engine, run_id)["status"] == "cancelled"


@pytest.mark.postgres
def test_two_deliveries_of_one_run_claiming_at_once_take_one_request(pg_engine: Engine) -> None:
    from domain.runs import store
    from tests.integration.conftest import harness

    with harness(pg_engine) as h:

        @h.registry.task(rate_limit="api")
        def call(ctx: Any) -> None:
            return None

        _define(pg_engine, "api", rpm=10)
        run_id = h.enqueue("call")
    now = utc_now()
    first = pg_engine.connect()
    first.begin()
    claimed = store.claim(first, run_id, owner="a", now=now, lease_s=30)
    assert isinstance(claimed, store.Claim)
    second: list[Any] = []

    def other_delivery() -> None:
        with pg_engine.begin() as conn:
            second.append(store.claim(conn, run_id, owner="b", now=now, lease_s=30))

    thread = threading.Thread(target=other_delivery)
    thread.start()
    time.sleep(0.3)  # it waits for the first claim's lock on the run
    assert thread.is_alive()
    first.commit()
    first.close()
    thread.join(10)
    assert second == [None]
    with pg_engine.connect() as conn:
        assert conn.execute(select(func.sum(rates.usage.c.requests))).scalar_one() == 1


def test_a_run_says_in_words_what_it_waits_for(h: Harness) -> None:
    @h.registry.task(rate_limit="slow-api")
    def call(ctx: Any) -> None:
        return None

    _define(h.engine, "slow-api", rpm=1)
    first, second = h.enqueue("call"), h.enqueue("call")
    assert h.get(first).waits_for() is None
    assert h.run(first) == "succeeded" and h.run(second) == "waiting"
    assert h.get(second).waits_for().startswith("room in the rate limit 'slow-api', next look")
