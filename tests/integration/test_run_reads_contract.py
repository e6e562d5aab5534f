"""The RunReads contract, held against every implementation on every database it runs on: the
portable reads on SQLite and PostgreSQL and the direct PostgreSQL reads give exactly what the
repository and the queries give, in UTC. The direct reads also survive a server that dropped
their connections."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError

from domain.db.models import cost_entries, projects, run_logs, run_steps, runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import DatabaseUnavailable, RunNotFound
from domain.runs import control
from domain.runs import reads as queries
from domain.runs.reads import RunReads, SqlRunReads
from domain.runs.reads_pg import PgReads
from domain.runs.repository import RunFilter
from domain.storage import run_reads
from domain.webhooks import inbound as webhooks
from tests.polling import eventually

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def reads(kind: str, db: Engine) -> Iterator[RunReads]:
    url = db.url.render_as_string(hide_password=False)
    implementation: RunReads = PgReads(url) if kind.startswith("pg") else SqlRunReads(db)
    yield implementation
    implementation.close()


@pytest.fixture
def pg_reads(pg_url: str) -> Iterator[PgReads]:
    reads = PgReads(pg_url)
    yield reads
    reads.close()


def test_storage_picks_the_direct_reads_on_postgresql(kind: str, db: Engine) -> None:
    chosen = run_reads(db)
    assert type(chosen) is (PgReads if kind.endswith("postgres") else SqlRunReads)
    chosen.close()


def seed(engine: Engine, n: int = 40) -> list[uuid.UUID]:
    """Runs with every kind of value a page carries; some share a created_at (the id breaks
    the tie), microseconds both zero and not."""
    rng = random.Random(7)
    rows = []
    for i in range(n):
        status = ["pending", "running", "succeeded", "failed", "cancelled"][i % 5]
        created = T0 + timedelta(seconds=i // 3, microseconds=(i % 2) * 120_000)
        rows.append(
            {
                "id": uuid.uuid4(),
                "project": ["default", "research"][i % 2],
                "name": ["report", "embed", "ünïcode"][i % 3],
                "queue": "gpu" if i % 4 == 1 else "default",
                "priority": i % 10,
                "params": {"i": i, "nested": {"big": 2**70, "list": [1.5, None, "x"]}},
                "status": status,
                "attempt": 1 if status != "pending" else 0,
                "max_attempts": 3,
                "idempotency_key": f"key-{i}" if i % 4 == 0 else None,
                "triggered_by": "api",
                "not_before": created,
                "created_at": created,
                "timeout_s": 30.0 if i % 3 == 0 else None,
                "budget_usd": Decimal("2.5") if i % 2 else None,
                "cost_usd": Decimal(rng.randint(0, 10**6)) / 10**7,
                "tokens_in": rng.randint(0, 10**9),
                "result": {"ok": i} if status == "succeeded" else None,
                "error_type": "ValueError" if status == "failed" else None,
                "error": "bad\nthing" if status == "failed" else None,
                "started_at": created if status != "pending" else None,
                "finished_at": created + timedelta(seconds=1.5)
                if status not in ("pending", "running")
                else None,
            }
        )
    with engine.begin() as conn:
        conn.execute(insert(projects).values(name="research", created_at=T0))
        conn.execute(insert(runs), rows)
    return [r["id"] for r in rows]


def all_pages(read: Any, filters: RunFilter, limit: int) -> list[tuple[list[dict[str, Any]], Any]]:
    pages, cursor = [], None
    while True:
        page = read(filters, limit=limit, cursor=cursor)
        pages.append(([item.to_dict() for item in page.items], page.next_cursor))
        cursor = page.next_cursor
        if cursor is None:
            return pages


@pytest.mark.parametrize(
    "filters",
    [
        RunFilter(),
        RunFilter(status=["failed", "succeeded"]),
        RunFilter(name="ünïcode"),
        RunFilter(project="research", status=["running"]),
        RunFilter(queue="gpu", status=["pending", "running"]),
        RunFilter(created_after=T0 + timedelta(seconds=3), created_before=T0 + timedelta(hours=1)),
        RunFilter(error="BAD\nTh", project="default"),
    ],
)
def test_pages_are_the_same_as_the_repositorys(
    db: Engine, reads: RunReads, filters: RunFilter
) -> None:
    seed(db)

    def repository_page(filters: RunFilter, *, limit: int, cursor: str | None) -> Any:
        return control.list_runs(UnitOfWork(db), filters, limit=limit, cursor=cursor)

    expected = all_pages(repository_page, filters, limit=7)
    assert sum(len(items) for items, _ in expected) > 0
    assert all_pages(reads.page, filters, limit=7) == expected


def test_a_detail_is_the_same_as_the_querys(db: Engine, reads: RunReads) -> None:
    run_id = seed(db, 3)[2]
    ts = T0 + timedelta(minutes=1)
    spend = [
        ("openai", "gpt-4o-mini", "0.0001900000"),
        ("anthropic", "claude", "0.25"),
        ("openai", "gpt-4o-mini", "0.0002100000"),
        ("Zeta", "b", "1"),  # first by code point (in en_US it would follow "anthropic")
        ("_local", "a", "0"),
    ]
    with db.begin() as conn:
        conn.execute(
            insert(run_steps),
            [
                {"run_id": run_id, "seq": seq, "attempt": 1, "name": f"s{seq}", "status": status}
                for seq, status in [(2, "running"), (1, "completed"), (3, "planned")]
            ],
        )
        conn.execute(
            insert(cost_entries),
            [
                {
                    "run_id": run_id,
                    "seq": seq,
                    "project": "default",
                    "ts": ts,
                    "provider": provider,
                    "model": model,
                    "tokens_in": 10**10,
                    "tokens_out": seq,
                    "requests": 1,
                    "cost_usd": Decimal(usd),
                    "step_seq": 1 if seq <= 2 else None,  # spent inside step 1
                }
                for seq, (provider, model, usd) in enumerate(spend, 1)
            ],
        )
        conn.execute(
            insert(run_logs),
            [
                {"run_id": run_id, "seq": seq, "attempt": 1, "ts": ts, "message": "m"}
                for seq in range(1, 6)
            ],
        )
    expected = queries.run_detail(UnitOfWork(db), run_id).to_dict()
    got = reads.detail(run_id).to_dict()
    assert got == expected
    assert [c["provider"] for c in got["costs"]] == ["Zeta", "_local", "anthropic", "openai"]
    assert got["totals"]["log_lines"] == 5
    by_seq = {step["seq"]: step for step in got["steps"]}
    assert Decimal(by_seq[1]["cost_usd"]) == Decimal("0.25019")  # exact, on SQLite too
    assert Decimal(by_seq[2]["cost_usd"]) == 0


def test_webhook_endpoints_are_the_same_as_the_unit_of_works(db: Engine, reads: RunReads) -> None:
    """The intake's lookup: enabled endpoints only, secrets decrypted, views equal."""
    key = Fernet.generate_key().decode()
    for name in ("github", "stripe", "off"):
        webhooks.add_webhook(UnitOfWork(db), name, target="job", secret_key=key, actor="test")
    with db.begin() as conn:
        conn.execute(
            webhooks.webhooks.update().where(webhooks.webhooks.c.name == "off"), {"enabled": False}
        )
    names = {"github", "stripe", "off", "unknown"}
    direct = webhooks.endpoints_of(reads.webhook_rows(sorted(names)), secret_key=key)
    assert direct == webhooks.endpoints(UnitOfWork(db), names, secret_key=key)
    assert sorted(direct) == ["github", "stripe"]
    assert direct["github"].hook.created_at.utcoffset() == timedelta(0)


def test_an_unknown_run_is_not_found(reads: RunReads) -> None:
    with pytest.raises(RunNotFound):
        reads.detail(uuid.uuid4())
    with pytest.raises(RunNotFound):
        reads.last_lines(uuid.uuid4())


def test_last_lines_are_the_same_as_the_querys(db: Engine, reads: RunReads) -> None:
    """The last lines oldest first, every field as the query reads it (fields JSON or none)."""
    run_id, other = seed(db, 2)
    with db.begin() as conn:
        conn.execute(
            insert(run_logs),
            [
                {
                    "run_id": rid,
                    "seq": seq,
                    "attempt": 1 + seq // 4,
                    "ts": T0 + timedelta(seconds=seq, microseconds=seq * 7),
                    "stream": "stdout" if seq % 2 else "log",
                    "level": "warning" if seq % 3 else "info",
                    "message": f"{rid} line {seq}",
                    "fields": {"n": seq, "nested": [seq]} if seq % 2 else None,
                }
                for rid in (run_id, other)
                for seq in range(1, 11)
            ],
        )
    expected = queries.last_logs(UnitOfWork(db), run_id, limit=4)
    got = reads.last_lines(run_id, limit=4)
    assert [line.to_dict() for line in got] == [line.to_dict() for line in expected]
    assert [line.seq for line in got] == [7, 8, 9, 10]
    assert {line.message.split()[0] for line in got} == {str(run_id)}
    assert all(line.ts.utcoffset() == timedelta(0) for line in got)


@pytest.mark.postgres
def test_timestamps_are_utc_whatever_the_sessions_zone(pg_url: str, pg_engine: Engine) -> None:
    seed(pg_engine, 2)
    options = {"options": "-c TimeZone=Asia/Kolkata -c statement_timeout=0"}
    zoned = PgReads(make_url(pg_url).update_query_dict(options).render_as_string(False))
    try:
        page = zoned.page(RunFilter(), limit=5)
        run = page.items[0]
        assert run.created_at.utcoffset() == timedelta(0)
        assert run.to_dict()["created_at"].endswith("+00:00")
        assert zoned.detail(run.id).run.created_at == run.created_at
    finally:
        zoned.close()


@pytest.mark.postgres
def test_a_connection_the_server_dropped_is_replaced(pg_engine: Engine, pg_reads: PgReads) -> None:
    seed(pg_engine, 3)
    assert len(pg_reads.page(RunFilter()).items) == 3
    [dropped] = _reads_sessions(pg_engine)
    with pg_engine.connect() as conn:  # what a server restart does to the pool's connections
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": dropped})
    assert len(pg_reads.page(RunFilter()).items) == 3  # tried again on a new connection
    assert len(pg_reads.page(RunFilter()).items) == 3  # and the reads go on from there
    eventually(lambda: dropped not in _reads_sessions(pg_engine), timeout=10)
    assert len(_reads_sessions(pg_engine)) == 1  # one new connection serves them
    pg_reads.close()  # no connection of either pool is left checked out, so none stays open
    eventually(lambda: _reads_sessions(pg_engine) == [], timeout=10, what="reads' sessions gone")


def _reads_sessions(engine: Engine) -> list[int]:
    """The server's sessions that PgReads opened (they have read runs), by backend pid."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND application_name = 'conveyor' AND query LIKE '%FROM runs%' "
                    "AND query NOT LIKE '%pg_stat_activity%'"
                )
            ).scalars()
        )


@pytest.mark.postgres
def test_a_value_the_database_refuses_is_sqlalchemys_data_error(pg_reads: PgReads) -> None:
    with pytest.raises(DataError):  # the API answers it with a 400, as for every other read
        pg_reads.page(RunFilter(name="nul\x00byte"))
    assert pg_reads.page(RunFilter()).items == []  # the connection is still good


@pytest.mark.postgres
def test_an_unreachable_database_is_a_clear_error() -> None:
    reads = PgReads("postgresql+psycopg://someone:hunter2@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            reads.page(RunFilter())
    finally:
        reads.close()
    assert "cannot reach the database" in str(caught.value)
    assert "hunter2" not in str(caught.value)
