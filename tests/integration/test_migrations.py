"""Migrations: upgrade/downgrade/upgrade on both databases; the models and revisions agree."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Uuid, bindparam, inspect, text

from domain.db.engine import create_db_engine
from domain.db.migrate import downgrade, head_revision, upgrade
from domain.db.partitions import is_partition
from domain.db.schema import compared_by_autogenerate, compared_objects, metadata
from domain.db.types import UTCDateTime
from tests.services import fresh_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    with fresh_database("conveyor_migrations") as url:
        yield url


# A run row as revisions 0007-0009 have it (every NOT NULL column without a default).
_RUN = (
    "INSERT INTO runs (id, project, kind, name, queue, priority, params, status, attempt,"
    " max_attempts, triggered_by, not_before, dispatch_attempts, cost_usd, tokens_in,"
    " tokens_out, requests_made, created_at) VALUES (:id, 'default', 'task', 't',"
    " 'default', 5, '{}', 'running', 1, 1, 'api', :now, 0, 0, 0, 0, 0, :now)"
)


def tables(url: str) -> set[str]:
    engine = create_db_engine(url, null_pool=True)
    try:
        names = set(inspect(engine).get_table_names()) - {"alembic_version"}
        return {name for name in names if not is_partition(name)}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db: str) -> None:
    upgrade(empty_db)
    assert tables(empty_db) == set(metadata.tables)
    downgrade(empty_db, revision="base")
    assert tables(empty_db) == set()
    upgrade(empty_db)
    assert tables(empty_db) == set(metadata.tables)
    engine = create_db_engine(empty_db, null_pool=True)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM projects")).scalars().all() == ["default"]
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == (
            head_revision(empty_db)
        )
    engine.dispose()


def test_models_match_the_migrations(empty_db: str) -> None:
    """Autogenerate against the migrated schema finds nothing: every change has a revision."""
    upgrade(empty_db)
    engine = create_db_engine(empty_db, null_pool=True)
    with engine.connect() as conn:
        opts = {
            "compare_type": True,
            "include_name": compared_by_autogenerate,
            "include_object": compared_objects(conn),
        }
        context = MigrationContext.configure(conn, opts=opts)
        diff = compare_metadata(context, metadata)
    engine.dispose()
    assert diff == []


def test_0008_numbers_existing_cost_entries_per_run_and_back(empty_db: str) -> None:
    """Entries recorded before 0008 get seqs 1..n per run in the order they were written, and
    each run's count matches; downgrading keeps every entry."""
    upgrade(empty_db, revision="0007")
    engine = create_db_engine(empty_db, null_pool=True)
    a, b = uuid.uuid4(), uuid.uuid4()
    run = _RUN
    entry = (
        "INSERT INTO cost_entries (run_id, project, ts, provider, model, tokens_in,"
        " tokens_out, requests, cost_usd) VALUES (:run, 'default', :now, 'p', :model,"
        " 1, 2, 1, 0)"
    )
    typed = [bindparam("id", type_=Uuid()), bindparam("run", type_=Uuid())]
    typed.append(bindparam("now", type_=UTCDateTime()))
    now = datetime.now(UTC)
    with engine.begin() as conn:
        for rid in (a, b):
            conn.execute(text(run).bindparams(typed[0], typed[2]), {"id": rid, "now": now})
        for rid, model in [(a, "a1"), (b, "b1"), (a, "a2"), (a, "a3"), (b, "b2")]:
            conn.execute(
                text(entry).bindparams(typed[1], typed[2]),
                {"run": rid, "now": now, "model": model},
            )
    engine.dispose()

    upgrade(empty_db, revision="0008")
    engine = create_db_engine(empty_db, null_pool=True)
    with engine.connect() as conn:
        numbered = conn.execute(
            text("SELECT run_id, seq, model FROM cost_entries ORDER BY model")
        ).all()
        counts = dict(conn.execute(text("SELECT id, cost_entry_count FROM runs")).all())
    engine.dispose()
    seqs = {row[2]: row[1] for row in numbered}
    assert seqs == {"a1": 1, "a2": 2, "a3": 3, "b1": 1, "b2": 2}
    assert {uuid.UUID(str(k)): v for k, v in counts.items()} == {a: 3, b: 2}

    downgrade(empty_db, revision="0007")
    engine = create_db_engine(empty_db, null_pool=True)
    with engine.connect() as conn:
        ids = conn.execute(text("SELECT id, model FROM cost_entries ORDER BY id")).all()
    engine.dispose()
    assert sorted(m for _, m in ids) == ["a1", "a2", "a3", "b1", "b2"]
    assert len({i for i, _ in ids}) == 5 and all(i is not None for i, _ in ids)
    upgrade(empty_db)


def test_0009_drops_the_log_key_and_downgrading_restores_it_without_orphans(
    empty_db: str,
) -> None:
    """Without the key a line can outlive its run (written outside conveyor's writers); the
    downgrade deletes such lines before it puts the key back."""
    upgrade(empty_db, revision="0009")
    engine = create_db_engine(empty_db, null_pool=True)
    kept, orphan = uuid.uuid4(), uuid.uuid4()
    line = (
        "INSERT INTO run_logs (run_id, seq, attempt, ts, stream, level, message)"
        " VALUES (:run, 1, 1, :now, 'log', 'info', :message)"
    )
    typed = [bindparam("id", type_=Uuid()), bindparam("now", type_=UTCDateTime())]
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(text(_RUN).bindparams(*typed), {"id": kept, "now": now})
        for run, message in [(kept, "kept"), (orphan, "orphan")]:
            conn.execute(
                text(line).bindparams(bindparam("run", type_=Uuid()), typed[1]),
                {"run": run, "now": now, "message": message},
            )
    assert inspect(engine).get_foreign_keys("run_logs") == []
    engine.dispose()

    downgrade(empty_db, revision="0008")
    engine = create_db_engine(empty_db, null_pool=True)
    with engine.connect() as conn:
        messages = conn.execute(text("SELECT message FROM run_logs")).scalars().all()
    [key] = inspect(engine).get_foreign_keys("run_logs")
    engine.dispose()
    assert messages == ["kept"]
    assert (key["referred_table"], key["options"].get("ondelete")) == ("runs", "CASCADE")
    upgrade(empty_db)


def _uuid7_at(when: datetime) -> uuid.UUID:
    """A uuid7 made at `when` (as domain.clock.uuid7 would have made it then)."""
    ms = int(when.timestamp() * 1000)
    return uuid.UUID(int=ms << 80 | 0x7 << 76 | 0b10 << 62 | uuid.uuid4().int & ((1 << 62) - 1))


@pytest.mark.postgres
def test_0019_partitions_logs_and_metrics_with_their_rows_and_back() -> None:
    """Lines and metrics written before 0019 are all there after it, each in its run's day
    partition (a run id that is not a uuid7 in DEFAULT); downgrading puts them back in plain
    tables, every row kept, and the metric ids go on from where they were."""
    now = datetime.now(UTC)
    old, today, foreign = _uuid7_at(now - timedelta(days=40)), _uuid7_at(now), uuid.uuid4()
    typed = [bindparam("id", type_=Uuid()), bindparam("now", type_=UTCDateTime())]
    line = (
        "INSERT INTO run_logs (run_id, seq, attempt, ts, stream, level, message)"
        " VALUES (:id, :seq, 1, :now, 'log', 'info', :message)"
    )
    metric = "INSERT INTO run_metrics (run_id, ts, name, value) VALUES (:id, :now, :name, 1)"
    with fresh_database("conveyor_migrations") as url:
        upgrade(url, revision="0018")
        engine = create_db_engine(url, null_pool=True)
        with engine.begin() as conn:
            for rid in (old, today, foreign):
                conn.execute(text(_RUN).bindparams(*typed), {"id": rid, "now": now})
                for seq in (1, 2):
                    conn.execute(
                        text(line).bindparams(*typed),
                        {"id": rid, "now": now, "seq": seq, "message": f"{rid} {seq}"},
                    )
                conn.execute(text(metric).bindparams(*typed), {"id": rid, "now": now, "name": "m"})
            before = _rows(conn)
        engine.dispose()

        upgrade(url, revision="0019")
        engine = create_db_engine(url, null_pool=True)
        with engine.begin() as conn:
            assert _rows(conn) == before
            homes = dict(
                conn.execute(
                    text("SELECT DISTINCT run_id, tableoid::regclass::text FROM run_logs")
                ).all()
            )
            assert homes == {
                old: f"run_logs_p{now - timedelta(days=40):%Y%m%d}",
                today: f"run_logs_p{now:%Y%m%d}",
                foreign: "run_logs_default",
            }
            kinds = dict(
                conn.execute(
                    text(
                        "SELECT relname, relkind FROM pg_class"
                        " WHERE relname IN ('run_logs', 'run_metrics')"
                    )
                ).all()
            )
            assert kinds == {"run_logs": "p", "run_metrics": "p"}
            # Written after the migration: routed by run id, the metric id sequence goes on.
            conn.execute(text(metric).bindparams(*typed), {"id": today, "now": now, "name": "n"})
            after = _rows(conn)
        engine.dispose()
        assert after["metrics"][-1][0] > before["metrics"][-1][0]

        downgrade(url, revision="0018")
        engine = create_db_engine(url, null_pool=True)
        with engine.begin() as conn:
            assert _rows(conn) == after
            assert (
                conn.execute(
                    text("SELECT count(*) FROM pg_class WHERE relname LIKE 'run\\_%\\_p2%'")
                ).scalar_one()
                == 0
            )
            [[logs_kind], [metrics_kind]] = conn.execute(
                text(
                    "SELECT relkind FROM pg_class WHERE relname IN ('run_logs', 'run_metrics')"
                    " ORDER BY relname"
                )
            ).all()
            assert (logs_kind, metrics_kind) == ("r", "r")
            conn.execute(text(metric).bindparams(*typed), {"id": old, "now": now, "name": "o"})
            assert _rows(conn)["metrics"][-1][0] > after["metrics"][-1][0]
            # The key is back: a metric of a run that does not exist is refused.
            with pytest.raises(Exception, match="foreign key"), conn.begin_nested():
                conn.execute(
                    text(metric).bindparams(*typed),
                    {"id": uuid.uuid4(), "now": now, "name": "x"},
                )
        engine.dispose()
        upgrade(url)


def _rows(conn: Any) -> dict[str, list[Any]]:
    return {
        "logs": [
            tuple(r)
            for r in conn.execute(
                text("SELECT run_id, seq, message FROM run_logs ORDER BY run_id, seq")
            )
        ],
        "metrics": [
            tuple(r)
            for r in conn.execute(text("SELECT id, run_id, name FROM run_metrics ORDER BY id"))
        ],
    }


@pytest.mark.postgres
def test_0021_indexes_run_errors_by_trigram_on_postgresql() -> None:
    """The error search's index is there after upgrading (pg_trgm is in this server's contrib)
    and gone after downgrading; the runs list's ILIKE is answered from it."""
    with fresh_database("conveyor_trgm") as url:
        upgrade(url)
        engine = create_db_engine(url, null_pool=True)
        try:
            with engine.connect() as conn:
                found = conn.execute(
                    text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_runs_error_trgm'")
                ).scalar_one()
                assert "gin_trgm_ops" in found and "error IS NOT NULL" in found
                conn.execute(text("SET enable_seqscan = off"))
                plan = "\n".join(
                    conn.execute(
                        text("EXPLAIN SELECT id FROM runs WHERE error ILIKE '%quota exh%'")
                    ).scalars()
                )
                assert "ix_runs_error_trgm" in plan, plan
            downgrade(url, revision="0020")
            with engine.connect() as conn:
                gone = conn.execute(
                    text("SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_runs_error_trgm'")
                ).scalar_one()
            assert gone == 0
        finally:
            engine.dispose()
