"""The fair-share `Turns` contract: PostgreSQL's one-round-trip top-up (domain/flow/fair_pg.py)
gives the same turns as the portable one (domain/flow/fair.py) on SQLite and on PostgreSQL,
scenario by scenario; and two top-ups of one queue at once never put more than its limit in
flight."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from domain.clock import utc_now
from domain.costs import projects
from domain.db.driver import ThreadConnections
from domain.db.engine import create_db_engine
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.flow import fair
from domain.flow.fair_pg import PgTurns
from domain.storage import turn_giver

NOW = utc_now()
T0 = NOW - timedelta(hours=1)


@dataclass
class Run:
    """One run of a scenario, as it is written on every database."""

    label: str
    project: str
    created_s: int  # seconds after T0: few values, so ties are common
    state: str = "waiting"  # waiting (its turn), flying (published), later (not due), other
    order: int = 0  # where its id sorts among the scenario's runs (ties on created_at)


@dataclass
class Scenario:
    name: str
    limit: int
    weights: dict[str, int]
    runs: list[Run]
    at_least: int = 1
    rounds: int = 3
    claims: list[int] = field(default_factory=lambda: [2, 3])


def _random_scenario(seed: int) -> Scenario:
    rng = random.Random(seed)
    names = rng.sample(["a", "B", "c", "d", "e"], rng.randint(1, 5))
    weights = {p: rng.choice([1, 1, 2, 3, 7]) for p in names}
    made: list[Run] = []
    for p in names:
        for state, most in (("waiting", 15), ("flying", 3), ("later", 3), ("other", 2)):
            for _ in range(rng.randint(0, most)):
                made.append(Run(f"{p}{len(made)}", p, rng.randint(0, 8), state))
    for order, i in enumerate(rng.sample(range(len(made)), len(made))):
        made[i].order = order
    return Scenario(
        f"random-{seed}",
        limit=rng.randint(1, 16),
        weights=weights,
        runs=made,
        at_least=rng.choice([1, 1, 2, 4]),
        claims=[rng.randint(0, 8) for _ in range(3)],
        rounds=4,
    )


def _runs(project: str, n: int, *, start: int = 0, state: str = "waiting") -> list[Run]:
    return [Run(f"{project}{start + i}", project, start + i, state) for i in range(n)]


def _ordered(made: list[Run]) -> list[Run]:
    for order, run in enumerate(made):
        run.order = order
    return made


SCENARIOS = [
    Scenario("empty queue", 5, {}, []),
    Scenario(
        "backlogs and in flight",
        10,
        {"a": 1, "B": 2, "c": 1},
        _ordered(
            _runs("a", 30)
            + _runs("a", 4, start=100, state="flying")
            + _runs("B", 8, start=3)
            # c has nothing in flight: it goes first, then places alternate by weight.
            + _runs("c", 2, start=50)
        ),
        rounds=4,
    ),
    Scenario(
        # The same created_at everywhere: the project's name (as Python orders it, "B"
        # before "a") breaks a tie between projects, the id one within a project.
        "ties",
        7,
        {"a": 1, "B": 1},
        [
            Run(f"{p}{i}", p, 0, order=order)
            for order, (p, i) in enumerate((p, i) for i in range(6) for p in ("a", "B"))
        ][::-1],
    ),
    Scenario(
        "not due yet",
        4,
        {"a": 1, "B": 1},
        _ordered(
            _runs("a", 3, state="later") + _runs("a", 2, start=5) + _runs("B", 2, state="later")
        ),
    ),
    Scenario(
        "full: fewer free places than asked for",
        5,
        {"a": 1},
        _ordered(_runs("a", 4, state="flying") + _runs("a", 5, start=10)),
        at_least=2,
        claims=[1, 1],
    ),
    *(_random_scenario(seed) for seed in range(20)),
]


def _write(engine: Engine, s: Scenario, copy: int) -> str:
    """The scenario on its own queue (and projects) of `engine`; ids sort as `order` says."""
    n = SCENARIOS.index(s)
    queue, prefix = f"q{copy}-{n}", f"s{copy}-{n}"
    for p, weight in s.weights.items():
        projects.add_project(UnitOfWork(engine), f"{prefix}{p}", weight=weight, now=NOW)
    rows = []
    for run in s.runs:
        flying, later = run.state == "flying", run.state == "later"
        rows.append(
            {
                "id": uuid.UUID(int=(copy << 120) | (n << 96) | (run.order << 32)),
                "project": f"{prefix}{run.project}",
                "name": "job",
                "queue": queue,
                "params": {"label": run.label},
                "status": "running" if run.state == "other" else "pending",
                "paced": True,
                "dispatched_at": T0 if flying or run.state == "other" else None,
                "not_before": NOW + timedelta(minutes=1) if later else T0,
                "created_at": T0 + timedelta(seconds=run.created_s),
            }
        )
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(runs), rows)
    return queue


def _claim(engine: Engine, queue: str, n: int) -> None:
    """n of the queue's runs in flight start (the first by id: alike on every database)."""
    with engine.begin() as conn:
        flying = select(runs.c.id).where(
            runs.c.queue == queue, runs.c.status == "pending", runs.c.dispatched_at.is_not(None)
        )
        ids = list(conn.execute(flying.order_by(runs.c.id).limit(n)).scalars())
        conn.execute(update(runs).where(runs.c.id.in_(ids)).values(status="running"))


@contextmanager
def _turns(engine: Engine, kind: str) -> Iterator[fair.Turns]:
    if not kind.startswith("pg"):
        yield fair.SqlTurns(engine)
        return
    connections = ThreadConnections(engine)
    try:
        yield PgTurns(connections)
    finally:
        connections.close()


def _play(engine: Engine, kind: str, s: Scenario, copy: int) -> list[list[tuple[str, int]]]:
    """The turns each round gives (run labels, priorities), places freed between rounds."""
    queue = _write(engine, s, copy)
    given = []
    with _turns(engine, kind) as turns:
        for round_ in range(s.rounds):
            sent = turns.give([queue], limit=s.limit, now=NOW, at_least=s.at_least)
            assert all(d.queue == queue and d.name == "job" for d in sent)
            given.append([(str((d.params or {})["label"]), d.priority) for d in sent])
            if round_ < len(s.claims):
                _claim(engine, queue, s.claims[round_])
    return given


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[tuple[str, int]]]]:
    """What the portable implementation gives on SQLite, per scenario: the reference."""
    from domain.db.migrate import upgrade

    path = tmp_path_factory.mktemp("fair-reference") / "reference.db"
    upgrade(f"sqlite:///{path}")
    engine = create_db_engine(f"sqlite:///{path}")
    try:
        return {s.name: _play(engine, "sql-sqlite", s, 0) for s in SCENARIOS}
    finally:
        engine.dispose()


def test_every_implementation_gives_the_same_turns(
    kind: str, db: Engine, expected: dict[str, list[list[tuple[str, int]]]]
) -> None:
    for s in SCENARIOS:
        assert _play(db, kind, s, 1) == expected[s.name], s.name


def test_the_reference_turns_are_the_rule(
    expected: dict[str, list[list[tuple[str, int]]]],
) -> None:
    """The reference itself, on the hand-made scenarios (fair.turns' rule, spelled out)."""
    labels = {
        name: [[label for label, _ in r] for r in rounds] for name, rounds in expected.items()
    }
    assert labels["empty queue"] == [[], [], []]
    # 6 places; a has 4 in flight, B (weight 2) and c none: B's (0 + 1) / 2 first; B4 and
    # c50 at 1 each, B4 the older; then c50, B5 (1.5); B6 and c51 at 2, B6 the older; c51.
    assert labels["backlogs and in flight"][0] == ["B3", "B4", "c50", "B5", "B6", "c51"]
    assert labels["ties"][0] == ["B0", "a0", "B1", "a1", "B2", "a2", "B3"]
    assert labels["not due yet"][0] == ["a5", "a6"]  # B has nothing due: passed over
    # One place free, two asked for: nothing; a claim later two are free.
    assert labels["full: fewer free places than asked for"] == [[], ["a10", "a11"], []]


def test_storage_picks_the_one_round_trip_top_up_on_postgresql(kind: str, db: Engine) -> None:
    expected = PgTurns if kind.endswith("postgres") else fair.SqlTurns
    assert type(turn_giver(db)) is expected


@pytest.mark.postgres
def test_two_top_ups_of_one_queue_at_once_never_pass_its_limit(pg_engine: Engine) -> None:
    """Each round frees every place, then two threads top the queue up at the same moment (on
    connections of their own, PostgreSQL's statement or the portable one): between them they
    fill the queue's places exactly once."""
    limit = 10
    for p in ("a", "b"):
        projects.add_project(UnitOfWork(pg_engine), p, now=NOW)
    rows = [
        {
            "project": p,
            "name": "job",
            "queue": "race",
            "paced": True,
            "not_before": T0,
            "created_at": T0 + timedelta(milliseconds=i),
        }
        for i in range(300)
        for p in ("a", "b")
    ]
    with pg_engine.begin() as conn:
        conn.execute(insert(runs), rows)
    connections = [ThreadConnections(pg_engine), ThreadConnections(pg_engine)]
    pairs: list[tuple[fair.Turns, fair.Turns]] = [
        (PgTurns(connections[0]), PgTurns(connections[1])),
        (PgTurns(connections[0]), fair.SqlTurns(pg_engine)),
    ]
    in_flight = select(func.count()).where(
        runs.c.queue == "race", runs.c.status == "pending", runs.c.dispatched_at.is_not(None)
    )
    barrier = threading.Barrier(2, timeout=30)  # both threads start their top-up at once

    def top_up(turns: fair.Turns, now: datetime) -> list[Any]:
        barrier.wait()
        return turns.give(["race"], limit=limit, now=now)

    try:
        with ThreadPoolExecutor(2) as pool:  # two threads: each keeps its connections
            for round_ in range(20):
                now = utc_now()
                both = [pool.submit(top_up, t, now) for t in pairs[round_ % 2]]
                ids = [d.run_id for f in both for d in f.result()]
                assert len(ids) == len(set(ids)) == limit, round_
                with pg_engine.begin() as conn:
                    assert conn.execute(in_flight).scalar_one() == limit
                    conn.execute(update(runs).where(runs.c.id.in_(ids)).values(status="running"))
    finally:
        for c in connections:
            c.close()
