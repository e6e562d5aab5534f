"""Each seed's example scenario, end to end through real worker processes (issue 8)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from conveyor import Client
from domain.clock import utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.housekeeping.retention import apply_retention
from domain.housekeeping.rollups import roll_up, stats_for
from domain.schedules import manage
from tests.e2e.stack import ROOT, Stack
from tests.polling import eventually
from tests.services import PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

MODULES = ",".join(
    f"examples.{m}.tasks" for m in ("agent_tasks", "dev_platform", "llm_jobs", "kanban")
)


@pytest.fixture(scope="module")
def stack(
    pg_database: str, redis_server: PrivateRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from cryptography.fernet import Fernet

    s = Stack(
        pg_database,
        tmp_path_factory.mktemp("examples"),
        redis_server.url(3),
        CONVEYOR_TASK_MODULES=MODULES,
        CONVEYOR_PIPELINES_DIR=str(ROOT / "pipelines"),
        CONVEYOR_SECRET_KEY=Fernet.generate_key().decode(),
        CONVEYOR_HOME=str(tmp_path_factory.mktemp("home")),
    )
    s.redis.flushdb()
    s.scheduler()
    s.worker("default", name="examples", concurrency=2)
    yield s
    s.stop_all()


@pytest.fixture
def client(stack: Stack, pg_url: str) -> Iterator[Client]:
    with stack.client() as c:
        yield c


def test_agent_tasks(client: Client, tmp_path: Path) -> None:
    from examples.agent_tasks import scenario

    result = scenario.run(client)
    waiting = result["waiting"]
    assert (waiting.status, waiting.wait_reason) == ("waiting", "signal:approval")
    assert result["children_before_approval"] == []  # nothing ran before the approval
    project = result["project"]
    assert project.status == "succeeded" and project.result["approved"] is True
    assert sorted(project.result["done"]) == sorted(result["after"]["done"])
    assert project.cost_usd > 0  # the plan's call, made once
    assert sorted(result["after"]["done"]) == [
        "fix login",
        "refactor api",
        "triage bugs",
        "write docs",
    ]
    assert all(r.status == "succeeded" and r.cost_usd > 0 for r in result["runs"])
    now = utc_now()
    roll_up(client.engine, now=now)
    [day] = stats_for(client.engine, period="day", name="agent_tasks.work")
    assert day["counts"]["succeeded"] == 4
    archived = apply_retention(
        client.engine, now=now + timedelta(days=31), default_days=30, archive_dir=tmp_path
    )
    assert archived >= 4 and list(tmp_path.glob("runs-*.jsonl.gz"))
    standup = [
        s
        for s in manage.list_schedules(UnitOfWork(client.engine))
        if s.name == "task:agent_tasks.standup"
    ]
    assert standup and standup[0].trigger == "interval"


def test_dev_platform(client: Client) -> None:
    from examples.dev_platform import scenario

    result = scenario.run(client)
    statuses = [r.status for r in result["runs"]]
    assert statuses == ["succeeded"] * 5
    assert result["refused_at"][0] == 5 and "new runs are refused" in result["refused_at"][1]
    assert result["usage"]["tokens"] == 5 * 750 and result["usage"]["reserved_usd"] == "0"
    assert all(r.duration_s is not None for r in result["runs"])
    # agents are workers: the registry lists them with their load (it is re-written every 5 s)
    eventually(lambda: any(not a["stopped"] for a in _workers(client)), timeout=15)


def _workers(client: Client) -> list[dict[str, object]]:
    from sqlalchemy import select

    from domain.db.models import workers

    with client.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(workers)).mappings()]


def test_llm_jobs(client: Client) -> None:
    from examples.llm_jobs import scenario

    result = scenario.run(client)
    ok = result["ok"]
    assert (ok.status, ok.requests_made, ok.tokens_in, ok.tokens_out) == ("succeeded", 3, 1500, 750)
    assert ok.cost_usd == Decimal("0.000675")
    assert [(s.name, s.status) for s in result["ok_steps"]] == [
        ("analyze", "completed"),
        ("code", "completed"),
        ("review", "completed"),
    ]
    resumed = result["resumed"]
    # attempt 2 went on after "code": three calls in all, as for the job that never crashed
    assert (resumed.status, resumed.attempt, resumed.requests_made) == ("succeeded", 2, 3)
    assert resumed.cost_usd == ok.cost_usd
    assert [(s.name, s.status, s.attempt) for s in result["resumed_steps"]] == [
        ("analyze", "completed", 1),
        ("code", "completed", 1),
        ("review", "completed", 2),
    ]
    tight = result["tight"]
    assert tight.status == "budget_exceeded" and "remaining budget" in (tight.error or "")
    assert result["cancelled"].status == "cancelled"


def test_kanban(client: Client, stack: Stack) -> None:
    from examples.kanban import scenario

    result = scenario.run(client)
    names = [s.name for s in result["stages"]]
    assert names == ["kanban.plan", "kanban.code", "kanban.review", "kanban.done"]
    assert all(s.status == "succeeded" for s in result["stages"])
    assert result["stages"][-1].result["history"] == "backlog > plan > code > review"
    assert all(s.triggered_by == "chain" for s in result["stages"][1:])
    types = [line.fields["type"] for line in result["logs"]["kanban.code"]]
    assert types == ["command", "output", "result"]
    assert [line.seq for line in result["logs"]["kanban.code"]] == [1, 2, 3]
    _ = signal  # (the stack fixture owns the processes)


def test_pipelines_runner(client: Client, stack: Stack) -> None:
    from sqlalchemy import select

    from domain.db.models_platform import Pipeline
    from domain.pipelines import store as pipeline_store
    from domain.pipelines.discovery import PipelineDirectory
    from examples.pipelines_runner import scenario

    # what `conveyor pipelines sync` does (the per-test truncation emptied the table)
    pipeline_store.sync(client.engine, PipelineDirectory(ROOT / "pipelines"))
    answers = scenario.deliver(client, stack.env["CONVEYOR_SECRET_KEY"])
    assert [a["status"] for a in answers] == [202, 200]  # the second delivery is the same run
    assert answers[0]["run_id"] == answers[1]["run_id"]
    hooked = client.wait(answers[0]["run_id"], timeout=120)
    assert (hooked.status, hooked.kind, hooked.triggered_by) == ("succeeded", "pipeline", "webhook")
    assert "Hello, from a webhook!" in [line.message for line in client.logs(hooked.id)]
    scenario.every_second(client)
    eventually(
        lambda: (
            len(
                [
                    r
                    for r in client.list(name="greeting").items
                    if r.triggered_by == "schedule" and r.status == "succeeded"
                ]
            )
            >= 2
        ),
        timeout=60,
    )
    with client.engine.connect() as conn:
        row = (
            conn.execute(select(Pipeline.__table__).where(Pipeline.name == "greeting"))
            .mappings()
            .one()
        )
    assert row["webhook_runs"] == 1 and row["successful_runs"] >= 3
