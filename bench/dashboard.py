"""Dashboard pages at 1,000,000 runs: each page's server time beside the API's JSON for the
same data, measured in the same run.

Method:
- a fresh database of its own gets --runs runs by COPY (spread over 30 days, 7 names, 3
  projects, 4 queues; 10% failed with an error text, 1% still pending or running), 100,000
  audit entries, 20 schedules, 5 pipelines, and one run with 200 log lines, 20 steps, cpu and
  memory samples and cost entries for the run page; then ANALYZE, as autovacuum would;
- the app is built in this process (create_api, as `conveyor api` builds it) and each request
  goes through its ASGI interface (httpx.ASGITransport): the time is the server's, routing,
  auth, reads and rendering, with no socket or HTTP parsing on either side;
- every page and its baseline are warmed up (not measured), then requested --repeat times
  interleaved (page, baseline, page, ...), so a slow minute of the shared machine hits both;
  the median and p95 are printed per page, with the ratio of the medians.

Target (issue 20): <= 100 ms per page. Run: `python -m bench.dashboard [--runs 1000000]
[--repeat 30]`. Never asserted in a test; results and the machine's state go in RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
from sqlalchemy import insert, text

from bench.common import fresh_database, libpq_dsn, percentile, table
from domain.db.engine import create_db_engine
from domain.db.models import RunMetric, cost_entries, projects, run_logs, run_steps
from domain.db.models_platform import Pipeline
from domain.db.unit_of_work import UnitOfWork
from domain.schedules.definitions import schedules
from domain.security import tokens

NAMES = ["report", "embed", "ingest", "sync", "notify", "resize", "score"]
QUEUES = ["default", "gpu", "io", "bulk"]
PROJECTS = ["default", "research", "ops"]
NOW = datetime.now(UTC).replace(microsecond=0)
RARE_ERROR = "quota exhausted for tenant 42"


def _run_rows(count: int) -> Iterator[tuple[Any, ...]]:
    """Runs, oldest first, over 30 days: most ended, a few failed, the newest 1% unfinished."""
    step = timedelta(days=30) / count
    start = NOW - timedelta(days=30)
    for i in range(count):
        created = start + step * i
        if i >= count * 0.99:
            status, finished, error = ("pending", "running")[i % 2], None, None
        elif i % 10 == 3:
            status, finished = "failed", created + timedelta(seconds=2)
            error = RARE_ERROR if i % 997 == 0 else f"timeout after {i % 60} s talking to db"
        else:
            status, finished, error = "succeeded", created + timedelta(seconds=1), None
        yield (
            uuid.UUID(int=i + 1),
            PROJECTS[i % 3],
            NAMES[i % 7],
            QUEUES[i % 4],
            json.dumps({"i": i}),
            status,
            1 if status != "pending" else 0,
            created,
            created,
            created if status != "pending" else None,
            finished,
            "TimeoutError" if error else None,
            error,
        )


RUN_COLUMNS = (
    "id, project, name, queue, params, status, attempt, not_before, created_at, started_at, "
    "finished_at, error_type, error"
)


def seed(url: str, count: int) -> uuid.UUID:
    """Everything the pages read; returns the id of the run with logs, steps and metrics."""
    engine = create_db_engine(url)
    with engine.begin() as conn:
        conn.execute(
            insert(projects),
            [
                {"name": p, "created_at": NOW, "monthly_cost_limit_usd": Decimal("100")}
                for p in PROJECTS[1:]
            ],
        )
    with psycopg.connect(libpq_dsn(url)) as pg:
        with pg.cursor() as cur:
            # The table's defaults for the columns COPY leaves out are SQLAlchemy's, client side.
            cur.execute(
                "ALTER TABLE runs ALTER kind SET DEFAULT 'task', ALTER priority SET DEFAULT 5,"
                " ALTER max_attempts SET DEFAULT 1, ALTER triggered_by SET DEFAULT 'api',"
                " ALTER dispatch_attempts SET DEFAULT 0, ALTER cost_usd SET DEFAULT 0,"
                " ALTER tokens_in SET DEFAULT 0, ALTER tokens_out SET DEFAULT 0,"
                " ALTER requests_made SET DEFAULT 0"
            )
            with cur.copy(f"COPY runs ({RUN_COLUMNS}) FROM STDIN") as copy:
                for row in _run_rows(count):
                    copy.write_row(row)
            with cur.copy(
                "COPY audit_logs (ts, actor, action, target_type, target_id, details, ip)"
                " FROM STDIN"
            ) as copy:
                for i in range(100_000):
                    copy.write_row(
                        (
                            NOW - timedelta(seconds=100_000 - i),
                            f"ops-{i % 5}",
                            "run.cancel",
                            "run",
                            str(uuid.UUID(int=i + 1)),
                            json.dumps({"reason": "bench"}),
                            "10.0.0.1",
                        )
                    )
        pg.commit()
    detail = uuid.UUID(int=count // 2)
    with engine.begin() as conn:
        conn.execute(
            insert(schedules),
            [
                {
                    "name": f"sched-{i}",
                    "target_name": "report",
                    "trigger": "cron",
                    "expression": f"{i} 3 * * *",
                    "timezone": "Europe/Berlin",
                    "next_fire_at": NOW + timedelta(hours=1),
                }
                for i in range(20)
            ],
        )
        conn.execute(
            insert(Pipeline.__table__),
            [
                {
                    "name": f"pipe-{i}",
                    "path": f"/srv/pipelines/pipe-{i}",
                    "description": "bench",
                    "tags": [],
                    "config": {},
                    "enabled": True,
                    "synced_at": NOW,
                    "total_runs": 10,
                    "successful_runs": 9,
                    "failed_runs": 1,
                    "webhook_runs": 0,
                }
                for i in range(5)
            ],
        )
        conn.execute(
            insert(run_logs),
            [
                {
                    "run_id": detail,
                    "seq": s,
                    "attempt": 1,
                    "ts": NOW,
                    "stream": "log",
                    "level": "info",
                    "message": f"line {s}",
                    "fields": {"s": s},
                }
                for s in range(1, 201)
            ],
        )
        conn.execute(
            insert(run_steps),
            [
                {
                    "run_id": detail,
                    "seq": s,
                    "attempt": 1,
                    "name": f"step-{s}",
                    "step_type": "step",
                    "status": "completed",
                    "started_at": NOW,
                    "finished_at": NOW,
                    "occurrence": 1,
                }
                for s in range(1, 21)
            ],
        )
        conn.execute(
            insert(RunMetric.__table__),
            [
                {"run_id": detail, "ts": NOW + timedelta(seconds=s), "name": name, "value": 1.0 * s}
                for s in range(100)
                for name in ("cpu_percent", "rss_bytes")
            ],
        )
        conn.execute(
            insert(cost_entries),
            [
                {
                    "run_id": detail,
                    "seq": s,
                    "step_seq": s,
                    "project": "default",
                    "ts": NOW,
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "tokens_in": 10,
                    "tokens_out": 2,
                    "requests": 1,
                    "cost_usd": Decimal("0.0001"),
                }
                for s in range(1, 21)
            ],
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()
    return detail


def pages(detail: uuid.UUID) -> list[tuple[str, str, str]]:
    """(what, dashboard page, the API's JSON for the same data)."""
    failed = "status=failed&name=embed"
    day_ago = NOW - timedelta(days=1)
    return [
        ("overview", "/", "/api/v1/workers"),
        ("runs, newest", "/runs", "/api/v1/runs"),
        ("runs, failed embed", f"/runs?{failed}", f"/api/v1/runs?{failed}"),
        *[
            (f"runs, error text ({which})", f"/runs?error={q}", f"/api/v1/runs?error={q}")
            for which, q in [
                ("rare", quote(RARE_ERROR[:15])),
                ("common", quote("timeout after")),
                ("absent", quote("no such failure")),
            ]
        ],
        ("a run", f"/runs/{detail}", f"/api/v1/runs/{detail}"),
        (
            "bulk retry, one day of failures",
            f"/runs/bulk?action=retry&status=failed&after={day_ago:%Y-%m-%dT%H:%M}",
            f"/api/v1/runs?status=failed&created_after={day_ago:%Y-%m-%dT%H:%M:%SZ}",
        ),
        ("schedules", "/schedules", "/api/v1/schedules"),
        ("pipelines", "/pipelines", "/api/v1/pipelines"),
        ("projects", "/projects", "/api/v1/costs?by=project"),
        ("limits", "/limits", "/api/v1/limits"),
        ("audit log", "/audit", "/api/v1/audit"),
    ]


async def measure(url: str, detail: uuid.UUID, repeat: int) -> list[list[object]]:
    from api.app import create_api
    from domain.settings import load_settings

    engine = create_db_engine(url)
    admin = tokens.create_token(UnitOfWork(engine), "bench", "admin", actor="bench")[1]
    app = create_api(load_settings(database_url=url, broker_url="memory://"), engine=engine)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    rows = []
    async with (
        httpx.AsyncClient(
            transport=transport,
            base_url="http://127.0.0.1",
            cookies={"conveyor_session": admin},
            headers={"Authorization": f"Bearer {admin}"},
        ) as http,
        app.router.lifespan_context(app),
    ):

        async def once(path: str) -> float:
            started = time.perf_counter()
            reply = await http.get(path)
            spent = (time.perf_counter() - started) * 1000
            if reply.status_code != 200:
                raise SystemExit(f"{path}: {reply.status_code} {reply.text[:300]}")
            return spent

        for what, page, baseline in pages(detail):
            for _ in range(3):  # warm: statements prepared, pools open
                await once(page)
                await once(baseline)
            ours, theirs = [], []
            for _ in range(repeat):
                ours.append(await once(page))
                theirs.append(await once(baseline))
            mine, base = statistics.median(ours), statistics.median(theirs)
            rows.append(
                [
                    what,
                    f"{mine:.1f}",
                    f"{percentile(ours, 95):.1f}",
                    baseline.split("?")[0].replace(str(detail), "{id}"),
                    f"{base:.1f}",
                    f"{mine / base:.2f}x",
                    "met" if mine <= 100 else "MISSED",
                ]
            )
    engine.dispose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    url = fresh_database("conveyor_bench_dashboard")
    started = time.perf_counter()
    detail = seed(url, args.runs)
    print(f"seeded {args.runs:,} runs in {time.perf_counter() - started:.1f} s (COPY)")
    rows = asyncio.run(measure(url, detail, args.repeat))
    table(
        ["page", "ms p50", "ms p95", "baseline (API JSON)", "ms p50", "ratio", "<= 100 ms"],
        rows,
    )


if __name__ == "__main__":
    main()
