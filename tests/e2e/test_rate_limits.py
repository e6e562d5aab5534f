"""A rate limit shared by 4 worker processes for 3 minutes (20 requests and 5,000 tokens per
minute): runs taking a request as they start and runs calling ctx.acquire before each model
call, all over the limit's demand. No 60 s window holds more than either limit, in the
limiter's own counts or in what the tasks wrote down, and the limit is used (≥ 80 %)."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from domain.db.models import runs
from domain.flow import rates
from tests.e2e.stack import Stack, with_scheduler
from tests.polling import eventually
from tests.services import PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

RPM, TPM = 20, 5_000
DURATION_S = 180
NAME = "e2e-llm"


@pytest.fixture
def stack(pg_url: str, redis_server: PrivateRedis, tmp_path: Path) -> Iterator[Stack]:
    with with_scheduler(pg_url, redis_server.url(14), tmp_path) as s:  # its relay wakes waiters
        yield s


def _windows_ok(per_second: dict[int, int], most: int) -> tuple[bool, int]:
    """Whether every 61 consecutive whole seconds (so every 60 s window) hold at most `most`;
    and the fullest such span."""
    if not per_second:
        return True, 0
    first, last = min(per_second), max(per_second)
    fullest = max(
        sum(per_second.get(s, 0) for s in range(start, start + rates.WINDOW_S))
        for start in range(first - rates.WINDOW_S + 1, last + 1)
    )
    return fullest <= most, fullest


def test_four_workers_share_20_requests_and_5000_tokens_a_minute(
    stack: Stack, pg_url: str, tmp_path: Path
) -> None:
    marks = tmp_path / "calls.jsonl"
    workers = [stack.worker("rated", name=f"w{i}", concurrency=2) for i in range(4)]
    engine = create_engine(pg_url)
    ledger: dict[int, tuple[int, int]] = {}

    def read_ledger() -> None:
        with engine.connect() as conn:
            for second, requests, tokens in conn.execute(
                select(rates.usage.c.second, rates.usage.c.requests, rates.usage.c.tokens).where(
                    rates.usage.c.limit_name == NAME
                )
            ):
                ledger[second] = (requests, tokens)  # the latest: after any settling

    def defined() -> bool:
        with engine.connect() as conn:
            return rates.get(conn, NAME) is not None

    try:
        eventually(defined, timeout=60, what="the workers wrote their code's rate limit")
        rng = random.Random(7)
        with stack.client() as client:
            made = client.enqueue_many(
                [
                    {
                        "name": "rated_call",
                        "params": {"marks": str(marks), "actual": a, "estimate": a + 120},
                        "queue": "rated",
                    }
                    for a in (rng.randint(150, 350) for _ in range(100))
                ]
                + [
                    {
                        "name": "rated_agent",
                        "params": {
                            "marks": str(marks),
                            "calls": [rng.randint(150, 350) for _ in range(4)],
                            "margin": 80,
                        },
                        "queue": "rated",
                    }
                    for _ in range(16)
                ]
            )
            started = time.monotonic()
            while time.monotonic() - started < DURATION_S:
                read_ledger()
                time.sleep(2)
            ids = [r.id for r in made]
            for run_id in ids:
                if client.get(run_id).status not in ("succeeded", "failed", "cancelled"):
                    client.cancel(run_id)
            for proc in workers:  # a warm shutdown: running tasks end (cancelled ones quickly)
                proc.send_signal(signal.SIGTERM)
            for proc in workers:
                proc.wait(timeout=90)
            read_ledger()
            with engine.connect() as conn:
                statuses = Counter(
                    conn.execute(select(runs.c.status).where(runs.c.id.in_(ids))).scalars()
                )
                started_calls = conn.execute(
                    select(runs.c.id).where(
                        runs.c.name == "rated_call", runs.c.started_at.is_not(None)
                    )
                ).all()
    finally:
        engine.dispose()

    calls = [json.loads(line) for line in marks.read_text().splitlines()]
    requests = {s: r for s, (r, _) in ledger.items()}
    tokens = {s: t for s, (_, t) in ledger.items()}
    ok_r, fullest_r = _windows_ok(requests, RPM)
    ok_t, fullest_t = _windows_ok(tokens, TPM)
    assert ok_r, f"{fullest_r} requests counted within 61 seconds (limit {RPM})"
    assert ok_t, f"{fullest_t} tokens counted within 61 seconds (limit {TPM})"

    # What the tasks wrote down agrees: every call's tokens were counted, settled to actual,
    # in the second its grant was counted in; every request is a started run or an acquire.
    from_calls: Counter[int] = Counter()
    for call in calls:
        from_calls[call["second"]] += call["actual"]
    assert dict(from_calls) == {s: t for s, t in tokens.items() if t}
    acquired = sum(call["requests"] for call in calls)
    assert sum(requests.values()) == acquired + len(started_calls)
    assert len({call["pid"] for call in calls}) >= 3, "the calls came from several processes"

    # Used: at least 80 % of what 3 minutes allow, from the first counted second.
    first = min(ledger)
    in_span = [s for s in ledger if s < first + DURATION_S - 10]
    assert sum(requests[s] for s in in_span) >= 0.8 * RPM * (DURATION_S - 10) / 60
    assert sum(tokens[s] for s in in_span) >= 0.8 * TPM * (DURATION_S - 10) / 60
    assert statuses["succeeded"] > 0 and set(statuses) <= {"succeeded", "cancelled"}
