"""A run's records (steps, metrics, costs, signals, artifacts, deliveries, fires, child runs)
live only while their run does, whichever way the keys to runs are kept: foreign keys on SQLite,
triggers on PostgreSQL (migration 0022). Each key behaves as its foreign key did."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from time import perf_counter, sleep
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, delete, insert, select, text
from sqlalchemy.exc import IntegrityError, NotSupportedError

from domain.db.capabilities import capabilities
from domain.db.engine import create_db_engine
from domain.db.migrate import downgrade, upgrade
from domain.db.models import projects, runs
from domain.db.schema import RUN_KEYS_AS_TRIGGERS, metadata
from domain.housekeeping.retention import apply_retention
from tests.concurrent import in_thread, waits_on_a_lock
from tests.polling import eventually
from tests.services import fresh_database

#: (table, column, ON DELETE) of every key to runs, as the models declare them.
KEYS = sorted(
    (table.name, key.elements[0].parent.name, key.ondelete)
    for table in metadata.tables.values()
    for key in table.foreign_key_constraints
    if key.referred_table.name == "runs"
)
TABLES = [table for table, _, _ in KEYS]
CASCADE = [table for table, _, action in KEYS if action == "CASCADE"]
SET_NULL = [(table, column) for table, column, action in KEYS if action == "SET NULL"]


def test_every_key_to_runs_is_one_the_triggers_carry_out() -> None:
    """The triggers do CASCADE and SET NULL; a key that refuses (NO ACTION, RESTRICT) or one
    0022 did not replace would need more than they do."""
    names = {f"fk_{table}_{column}_runs" for table, column, _ in KEYS}
    assert names == RUN_KEYS_AS_TRIGGERS
    assert {action for _, _, action in KEYS} == {"CASCADE", "SET NULL"}


def _run(conn: Connection, **values: Any) -> uuid.UUID:
    run_id = values.pop("id", None) or uuid.uuid4()
    now = datetime.now(UTC)
    values.setdefault("created_at", now)
    conn.execute(insert(runs).values(id=run_id, name="r", not_before=now, **values))
    return run_id


def _owners(conn: Connection) -> tuple[int, int]:
    """A schedule and a webhook for fires and deliveries to belong to."""
    schedules, webhooks = metadata.tables["schedules"], metadata.tables["webhooks"]
    schedule = conn.execute(
        insert(schedules)
        .values(name="s", target_name="t", trigger="interval", expression="60")
        .returning(schedules.c.id)
    ).scalar_one()
    webhook = conn.execute(
        insert(webhooks)
        .values(name="w", target_name="t", secret_ciphertext="x")
        .returning(webhooks.c.id)
    ).scalar_one()
    return int(schedule), int(webhook)


def _record(table: str, run_id: uuid.UUID, owners: tuple[int, int]) -> dict[str, Any]:
    """A row of `table` that points at `run_id`."""
    now = datetime.now(UTC)
    rows: dict[str, dict[str, Any]] = {
        "cost_entries": {"seq": 1, "project": "default", "ts": now, "provider": "p", "model": "m"},
        "cost_reservations": {"project": "default", "month": date.today()},
        "outbound_deliveries": {"kind": "callback", "url": "http://example.invalid/"},
        "run_artifacts": {"name": "a", "path": "a", "size_bytes": 1, "sha256": "0" * 64},
        "run_metrics": {"ts": now, "name": "m", "value": 1.0},
        "run_signals": {"name": "s"},
        "run_steps": {"seq": 1, "name": "s"},
        "runs": {"id": uuid.uuid4(), "name": "child", "not_before": now, "created_at": now},
        "schedule_fires": {
            "schedule_id": owners[0],
            "fire_at": now + timedelta(seconds=uuid.uuid4().int % 10**6),
            "outcome": "enqueued",
        },
        "webhook_deliveries": {"webhook_id": owners[1], "delivery_id": str(uuid.uuid4())},
    }
    column = "parent_run_id" if table == "runs" else "run_id"
    return {**rows[table], column: run_id}


def _records_of(conn: Connection, run_id: uuid.UUID) -> dict[str, int]:
    """How many rows of each referencing table point at `run_id`."""
    return {
        table: conn.execute(
            select(text("count(*)"))
            .select_from(metadata.tables[table])
            .where(metadata.tables[table].c[column] == run_id)
        ).scalar_one()
        for table, column, _ in KEYS
    }


@pytest.mark.parametrize(("table", "column"), [(t, c) for t, c, _ in KEYS])
def test_a_record_of_a_run_that_is_not_there_is_refused(
    engine: Engine, table: str, column: str
) -> None:
    with engine.begin() as conn:
        owners = _owners(conn)
    with pytest.raises(IntegrityError) as refused, engine.begin() as conn:
        conn.execute(insert(metadata.tables[table]).values(_record(table, uuid.uuid4(), owners)))
    if capabilities(engine).run_key_triggers:
        orig: Any = refused.value.orig
        assert orig.sqlstate == "23503"
        assert orig.diag.constraint_name == f"fk_{table}_{column}_runs"
        assert "violates foreign key constraint" in str(orig)


def test_deleting_runs_takes_their_records_and_unlinks_the_rest(engine: Engine) -> None:
    """Records of the deleted runs go (CASCADE) or lose their link (SET NULL); every other
    run's records stay as they were."""
    with engine.begin() as conn:
        owners = _owners(conn)
        gone, also_gone, kept = _run(conn), _run(conn), _run(conn)
        for run_id in (gone, also_gone, kept):
            for table, _, _ in KEYS:
                conn.execute(insert(metadata.tables[table]).values(_record(table, run_id, owners)))
        before = {table: _count(conn, table) for table, _, _ in KEYS}
    with engine.begin() as conn:
        assert conn.execute(delete(runs).where(runs.c.id.in_([gone, also_gone]))).rowcount == 2
    with engine.begin() as conn:
        assert _records_of(conn, gone) == dict.fromkeys(before, 0)
        assert _records_of(conn, also_gone) == dict.fromkeys(before, 0)
        assert _records_of(conn, kept) == dict.fromkeys(before, 1)
        after = {table: _count(conn, table) for table, _, _ in KEYS}
    # A deleted run's child runs are not deleted: they lose their parent.
    expected = {table: n - 2 if table in CASCADE else n for table, n in before.items()}
    expected["runs"] = before["runs"] - 2
    assert after == expected
    with engine.begin() as conn:
        for table, column in SET_NULL:
            unlinked = metadata.tables[table].c[column].is_(None)
            found = conn.execute(
                select(text("count(*)")).select_from(metadata.tables[table]).where(unlinked)
            ).scalar_one()
            # Both deleted runs' records; of the runs, also the kept parent (it has none).
            assert found == (3 if table == "runs" else 2), table


def _count(conn: Connection, table: str) -> int:
    return int(
        conn.execute(select(text("count(*)")).select_from(metadata.tables[table])).scalar_one()
    )


def test_a_project_with_runs_still_cannot_be_deleted(engine: Engine) -> None:
    """The keys that refuse are keys still (runs.project, RESTRICT): 0022 replaced only keys
    to runs."""
    with engine.begin() as conn:
        _run(conn)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(delete(projects).where(projects.c.name == "default"))


@pytest.mark.postgres
def test_a_run_id_never_changes(pg_engine: Engine) -> None:
    with pg_engine.begin() as conn:
        run_id = _run(conn)
    with pytest.raises(IntegrityError, match="changes a run's id"), pg_engine.begin() as conn:
        conn.execute(runs.update().where(runs.c.id == run_id).values(id=uuid.uuid4()))
    with pg_engine.begin() as conn:  # other columns change as ever
        conn.execute(runs.update().where(runs.c.id == run_id).values(name="renamed"))
        assert conn.execute(select(runs.c.name).where(runs.c.id == run_id)).scalar() == "renamed"


@pytest.mark.postgres
def test_truncating_runs_alone_is_refused_while_records_point_at_them(pg_engine: Engine) -> None:
    with pg_engine.begin() as conn:
        run_id = _run(conn)
        conn.execute(
            insert(metadata.tables["run_steps"]).values(_record("run_steps", run_id, (0, 0)))
        )
    with pytest.raises(NotSupportedError, match="run_steps"), pg_engine.begin() as conn:
        conn.execute(text("TRUNCATE runs CASCADE"))
    with pg_engine.begin() as conn:
        conn.execute(text("TRUNCATE runs, run_steps"))
        assert _count(conn, "run_steps") == 0


# Two connections: a writer adding a step while a deleter deletes its run.


@pytest.fixture
def two(pg_engine: Engine) -> Iterator[tuple[Engine, uuid.UUID]]:
    with pg_engine.begin() as conn:
        run_id = _run(conn)
    yield pg_engine, run_id


@pytest.mark.postgres
def test_a_step_written_while_its_run_is_deleted_is_refused(two: tuple[Engine, uuid.UUID]) -> None:
    """The delete holds the run; the writer's check waits for it, then finds no run."""
    engine, run_id = two
    with engine.connect() as deleter:
        deleter.begin()
        deleter.execute(delete(runs).where(runs.c.id == run_id))

        def write() -> None:
            with engine.begin() as conn:
                conn.execute(
                    insert(metadata.tables["run_steps"]).values(
                        _record("run_steps", run_id, (0, 0))
                    )
                )

        writer, out = in_thread(write)
        eventually(waits_on_a_lock(engine), timeout=10, every=0.02)
        deleter.commit()
    writer.join(timeout=10)
    assert isinstance(out.get("error"), IntegrityError), out
    with engine.connect() as conn:
        assert _count(conn, "run_steps") == 0


@pytest.mark.postgres
def test_a_run_deleted_while_a_step_is_written_takes_the_step(
    two: tuple[Engine, uuid.UUID],
) -> None:
    """The writer holds the run (FOR KEY SHARE); the delete waits for it to commit, then its
    statement trigger sees the step and deletes it."""
    engine, run_id = two
    with engine.connect() as writer:
        writer.begin()
        writer.execute(
            insert(metadata.tables["run_steps"]).values(_record("run_steps", run_id, (0, 0)))
        )

        def remove() -> int:
            with engine.connect() as conn:
                conn.execution_options(isolation_level="READ COMMITTED")
                with conn.begin():
                    return int(conn.execute(delete(runs).where(runs.c.id == run_id)).rowcount)

        deleter, out = in_thread(remove)
        eventually(waits_on_a_lock(engine), timeout=10, every=0.02)
        writer.commit()
    deleter.join(timeout=10)
    assert out == {"value": 1}
    with engine.connect() as conn:
        assert _count(conn, "run_steps") == 0 and _count(conn, "runs") == 0


def test_retention_deletes_the_runs_past_their_age_with_their_records(engine: Engine) -> None:
    """Old finished runs go with every record; a recent one and an unfinished old one stay
    with theirs; retention rests after its transactions."""
    now = datetime.now(UTC)
    old = {"created_at": now - timedelta(days=41), "finished_at": now - timedelta(days=40)}
    with engine.begin() as conn:
        owners = _owners(conn)
        gone = [_run(conn, status="succeeded", **old) for _ in range(3)]
        kept = [
            _run(conn, status="succeeded", finished_at=now),
            _run(conn, status="running", created_at=old["created_at"]),
        ]
        for run_id in gone + kept:
            for table, _, _ in KEYS:
                conn.execute(insert(metadata.tables[table]).values(_record(table, run_id, owners)))
    rests: list[float] = []
    assert apply_retention(engine, now=now, default_days=30, batch=2, sleep=rests.append) == 3
    assert rests and all(r >= 0 for r in rests)
    with engine.connect() as conn:
        for run_id in gone:
            assert _records_of(conn, run_id) == dict.fromkeys(TABLES, 0)
        for run_id in kept:
            assert _records_of(conn, run_id) == dict.fromkeys(TABLES, 1)
        left = set(conn.execute(select(runs.c.id).where(runs.c.parent_run_id.is_(None))).scalars())
    assert not left & set(gone)


def test_retention_past_its_slice_starts_no_transaction_and_the_next_call_goes_on(
    engine: Engine,
) -> None:
    """The scheduler gives retention a slice of its loop (`until`): past it, no transaction
    starts, and what is left goes at the following calls."""
    now = datetime.now(UTC)
    old = {"created_at": now - timedelta(days=41), "finished_at": now - timedelta(days=40)}
    with engine.begin() as conn:
        gone = {_run(conn, status="succeeded", **old) for _ in range(3)}
    assert apply_retention(engine, now=now, default_days=30, until=perf_counter() - 1) == 0
    with engine.connect() as conn:
        assert gone <= set(conn.execute(select(runs.c.id)).scalars())
    left = [3]

    def rest_long_after_a_delete(_took: float) -> None:
        """A rest that outlasts the slice after each transaction that deleted a run."""
        with engine.connect() as conn:
            now_left = len(gone & set(conn.execute(select(runs.c.id)).scalars()))
        if now_left < left[0]:
            left[0] = now_left
            sleep(0.4)

    calls = deleted = 0
    while deleted < 3 and calls < 10:
        until = perf_counter() + 0.3
        deleted += apply_retention(
            engine, now=now, default_days=30, batch=1, sleep=rest_long_after_a_delete, until=until
        )
        calls += 1
    assert deleted == 3
    if not capabilities(engine).partitioned_history:  # row by row: a call per run
        assert calls == 3


# The migration, up and down, with rows in the tables.

_KEYS_SQL = (
    "SELECT conname, conrelid::regclass::text, pg_get_constraintdef(oid), confdeltype,"
    " confupdtype, confmatchtype, condeferrable, condeferred, convalidated, conislocal,"
    " coninhcount, conparentid <> 0 FROM pg_constraint WHERE contype = 'f'"
    " ORDER BY conrelid::regclass::text, conname"
)


@pytest.mark.postgres
def test_0022_up_and_down_keeps_the_records_drops_the_orphans_and_restores_the_keys() -> None:
    with fresh_database("conveyor_run_keys") as url:
        upgrade(url, revision="0021")
        engine = create_db_engine(url, null_pool=True)
        try:
            with engine.begin() as conn:
                keys_before = conn.execute(text(_KEYS_SQL)).all()
                owners = _owners(conn)
                kept = _run(conn)
                for table, _, _ in KEYS:
                    conn.execute(
                        insert(metadata.tables[table]).values(_record(table, kept, owners))
                    )
                before = {table: _count(conn, table) for table, _, _ in KEYS}

            upgrade(url, revision="0022")
            with engine.begin() as conn:
                assert (
                    conn.execute(
                        text(
                            "SELECT count(*) FROM pg_constraint WHERE confrelid = 'runs'::regclass"
                        )
                    ).scalar_one()
                    == 0
                )
                assert {table: _count(conn, table) for table, _, _ in KEYS} == before
                # A path no trigger sees: every record of a run that is not there.
                conn.execute(text("SET LOCAL session_replication_role = replica"))
                lost = uuid.uuid4()
                for table, _, _ in KEYS:
                    conn.execute(
                        insert(metadata.tables[table]).values(_record(table, lost, owners))
                    )

            downgrade(url, revision="0021")
            with engine.begin() as conn:
                assert conn.execute(text(_KEYS_SQL)).all() == keys_before
                assert _records_of(conn, kept) == dict.fromkeys(before, 1)
                assert _records_of(conn, lost) == dict.fromkeys(before, 0)
                after = {table: _count(conn, table) for table, _, _ in KEYS}
            # The lost run's records went (CASCADE), or stayed without their link (SET NULL).
            assert after == {
                table: n + (0 if table in CASCADE else 1) for table, n in before.items()
            }
            upgrade(url)
        finally:
            engine.dispose()
