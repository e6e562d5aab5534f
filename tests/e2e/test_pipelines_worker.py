"""Directory pipelines through real worker processes on PostgreSQL + Redis."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import make_url, select

from conveyor import Client
from domain.db.models import run_logs, runs
from domain.db.unit_of_work import UnitOfWork
from domain.pipelines.discovery import PipelineCatalog, PipelineDirectory
from domain.security import tokens as auth
from domain.security.secrets import SecretStore
from tests.e2e.stack import Stack
from tests.leaks import copy_escaped, found_in, secret_forms, stored_leaks
from tests.pipeline_support import FIXTURES, ROOT, make_pipeline
from tests.polling import eventually
from tests.services import PrivateRedis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

KEY = Fernet.generate_key().decode()
#: Not the Redis database of tests/e2e/stack.py: another e2e module's workers must never see
#: (and drop) these runs' messages.
REDIS_DB = 11
TOKEN = "e2e-token-5f0c9a77"
#: Quotes, backslash, non-ASCII, %, + and /: each changes how a serializer writes the value.
SHAPED = "e2e 'sh\"ap\\ed' ünïcødé/€ 99%+"
FILE_TOKEN = "e2e-file-token-61d0"


@pytest.fixture(scope="module")
def pipelines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipelines")
    for name in ("test_simple", "test_failing", "test_logging", "leaky_shapes"):
        shutil.copytree(FIXTURES / name, root / name)
    # A requirements pipeline whose environment no other test has built: the first two runs
    # race for it.
    shared = make_pipeline(
        root,
        "fresh_env",
        "import six\nprint('six', six.__version__)\n",
        requirements="six==1.17.0\n# e2e-only environment\n",
    )
    assert shared.exists()
    shutil.copytree(ROOT / "pipelines" / "with_secret", root / "with_secret")
    make_pipeline(
        root,
        "stubborn",
        textwrap.dedent(
            """
            import os, signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if os.fork() == 0:
                with open(os.environ["PIDS_FILE"], "a") as f:
                    f.write(f"{os.getpid()}\\n")
                time.sleep(600)
            with open(os.environ["PIDS_FILE"], "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(600)
            """
        ),
        {"timeout": 3},
    )
    return root


@pytest.fixture(scope="module")
def stack(
    pg_database: str,
    pipelines_dir: Path,
    redis_server: PrivateRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("home")
    s = Stack(
        pg_database,
        tmp_path_factory.mktemp("logs"),
        redis_server.url(REDIS_DB),
        CONVEYOR_TASK_MODULES="tests.e2e.worker_tasks",
        CONVEYOR_PIPELINES_DIR=str(pipelines_dir),
        CONVEYOR_PIPELINE_CACHE_DIR=str(home / "envs"),
        CONVEYOR_ARTIFACTS_ROOT=str(home / "artifacts"),
        CONVEYOR_SECRET_KEY=KEY,
        CONVEYOR_KILL_GRACE_S="2",
    )
    s.redis.flushdb()
    yield s
    s.stop_all()


@pytest.fixture(scope="module")
def started(stack: Stack, pg_database: str) -> Stack:
    """The secret is stored before the workers start (they check the key opens it)."""
    from domain.db.engine import create_db_engine

    engine = create_db_engine(pg_database)
    store = SecretStore(engine, KEY)
    store.set("API_TOKEN", TOKEN)
    store.set("SHAPED_TOKEN", SHAPED)
    store.set("FILE_TOKEN", FILE_TOKEN)
    engine.dispose()
    stack.scheduler()
    stack.worker("default", name="pipelines", concurrency=2)
    return stack


@pytest.fixture
def client(started: Stack, pipelines_dir: Path) -> Iterator[Client]:
    catalog = PipelineCatalog(PipelineDirectory(pipelines_dir))
    with Client(started.settings, catalog=catalog) as c:
        yield c


def messages(client: Client, run_id: uuid.UUID) -> list[str]:
    with client.engine.connect() as conn:
        return list(
            conn.execute(
                select(run_logs.c.message)
                .where(run_logs.c.run_id == run_id)
                .order_by(run_logs.c.seq)
            ).scalars()
        )


def test_fast_flow_pipelines_run_with_their_outcomes_and_retries(client: Client) -> None:
    ok = client.enqueue("test_simple")
    failing = client.enqueue("test_failing")
    logging = client.enqueue("test_logging")
    assert client.wait(ok.id, timeout=60).status == "succeeded"
    assert "TEST_ENV_VAR=from_pipeline_json" in messages(client, ok.id)
    final = client.wait(failing.id, timeout=90)
    assert (final.status, final.attempt, final.error_type) == ("failed", 2, "PipelineFailed")
    assert client.wait(logging.id, timeout=60).status == "succeeded"
    assert final.exit_code not in (None, 0)  # the process's exit code is on the run
    assert client.get(ok.id).exit_code == 0
    # counters move in each run's final transaction: the failed first attempt of test_failing
    # was retried, so only its final outcome counts
    from domain.db.models_platform import Pipeline

    with client.engine.connect() as conn:
        counts = {
            r.name: (r.total_runs, r.successful_runs, r.failed_runs)
            for r in conn.execute(select(Pipeline.__table__))
        }
    assert counts["test_failing"] == (1, 0, 1)
    assert counts["test_simple"][1] >= 1 and counts["test_simple"][2] == 0


def test_concurrent_first_runs_share_one_environment_build(client: Client) -> None:
    first, second = client.enqueue("fresh_env"), client.enqueue("fresh_env")
    for run in (first, second):
        assert client.wait(run.id, timeout=120).status == "succeeded"
    builds = [
        m
        for run in (first, second)
        for m in messages(client, run.id)
        if m.startswith("building environment")
    ]
    assert len(builds) == 1
    assert all("six 1.17.0" in messages(client, r.id) for r in (first, second))


def test_timeout_kills_the_process_tree_in_a_worker(client: Client, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    run = client.enqueue("stubborn", {"PIDS_FILE": str(pids)})
    final = client.wait(run.id, timeout=60)
    assert (final.status, final.error_type) == ("timed_out", "RunTimedOut")
    noted = [int(p) for p in pids.read_text().split()]
    assert len(noted) == 2

    def all_dead() -> bool:
        for pid in noted:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    eventually(all_dead, timeout=10)
    assert client.wait(client.enqueue("test_simple").id, timeout=60).status == "succeeded"


def test_cancel_kills_a_running_pipeline(client: Client, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    run = client.enqueue("stubborn", {"PIDS_FILE": str(pids)}, timeout=120)
    eventually(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout=60)
    client.cancel(run.id)
    assert client.wait(run.id, timeout=30).status == "cancelled"
    for pid in (int(p) for p in pids.read_text().split()):
        eventually(
            lambda pid=pid: (
                not psutil.pid_exists(pid)  # type: ignore[misc]
                or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            ),
            timeout=10,
        )


def test_a_secret_never_reaches_the_stored_logs(client: Client) -> None:
    run = client.enqueue("with_secret")
    assert client.wait(run.id, timeout=60).status == "succeeded"
    assert "the token is ***" in messages(client, run.id)
    with client.engine.connect() as conn:
        everything = conn.execute(select(run_logs.c.message, run_logs.c.fields)).all()
        results = conn.execute(select(runs.c.result, runs.c.error)).all()
    assert TOKEN not in repr(everything) + repr(results)


def test_no_form_of_a_secret_reaches_the_database_or_the_api(
    client: Client, started: Stack, pg_database: str
) -> None:
    """A real worker runs a pipeline printing its secrets in every shape (plain, JSON both
    ways, repr, URL-encoded, base64, inside step/log/metric/cost/result events, as artifact
    names, in its failure): no column, no line of a pg_dump and no API answer holds any form."""
    ok = client.enqueue("leaky_shapes")
    bad = client.enqueue("leaky_shapes", {"fail": True})
    assert client.wait(ok.id, timeout=90).status == "succeeded"
    assert client.wait(bad.id, timeout=90).status == "failed"
    secrets = [TOKEN, SHAPED, FILE_TOKEN]
    assert stored_leaks(client.engine, secrets) == []

    libpq = make_url(pg_database).set(drivername="postgresql").render_as_string(False)
    dump = subprocess.run(
        ["pg_dump", "--data-only", libpq], capture_output=True, check=True, timeout=120
    ).stdout.decode()
    assert "leaky_shapes" in dump and "plain: ***" in dump  # the runs are in it, masked
    escaped = [copy_escaped(form) for s in secrets for form in secret_forms(s)]
    assert found_in(dump, secrets) == [] and [f for f in escaped if f in dump] == []

    api = started.api(name="api-secrets")
    _, token = auth.create_token(UnitOfWork(client.engine), "leak-reader", "readonly", actor="t")
    paths = [
        "/api/v1/runs?name=leaky_shapes",
        "/api/v1/costs?by=model",
        "/api/v1/costs?by=provider",
    ]
    for run in (ok, bad):
        paths += [f"/api/v1/runs/{run.id}{tail}" for tail in ("", "/logs", "/metrics", "/costs")]
        paths.append(f"/api/v1/runs/{run.id}/artifacts")
    answers = []
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}) as http:
        for path in paths:
            response = http.get(path, timeout=10)
            assert response.status_code == 200, (path, response.text)
            answers.append(response.text)
    text = "\n".join(answers)
    assert "report-***.txt" in text and "metric ***" in text and "m-***" in text
    assert found_in(text, secrets) == []
