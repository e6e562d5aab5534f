"""Directory pipelines through the real executor: outcomes, logs, events, limits, kills."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine, select

from domain.db.models import CostEntry, runs
from domain.errors import InvalidInput, UnknownTask
from domain.pipelines.store import sync
from tests.pipeline_support import (
    ROOT,
    PipelineHarness,
    copy_fixtures,
    make_pipeline,
    sqlite_pipeline_harness,
    tmp_pipeline_harness,
)
from tests.polling import eventually

pytestmark = pytest.mark.slow


@pytest.fixture
def h(
    engine: Engine, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineHarness]:
    """On SQLite and PostgreSQL."""
    with tmp_pipeline_harness(engine, tmp_path, tmp_path_factory) as harness:
        yield harness


@pytest.fixture
def h1(
    sqlite_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineHarness]:
    """SQLite only: for tests about processes rather than the database."""
    with sqlite_pipeline_harness(sqlite_url, tmp_path, tmp_path_factory) as harness:
        yield harness


def test_fast_flow_test_simple_runs_unchanged(h: PipelineHarness) -> None:
    copy_fixtures(h.root, "test_simple")
    run_id = h.enqueue("test_simple")
    created = h.get(run_id)
    assert (created.kind, created.max_attempts, created.timeout_s) == ("pipeline", 3, 60)
    assert h.run(run_id) == "succeeded"
    run = h.get(run_id)
    assert run.result == {"exit_code": 0, "result": None, "artifacts": []}
    out = h.lines(run_id, "stdout")
    assert out[0] == "test_simple: start" and out[-1] == "test_simple: done"
    assert "TEST_ENV_VAR=from_pipeline_json" in out
    env_event = next(f for s, m, f in h.logs(run_id) if m == "pipeline environment")
    assert env_event["env"]["TEST_ENV_VAR"] == "from_pipeline_json"
    assert env_event["requirements_hash"] is None  # no requirements: the bare interpreter
    assert "peak_rss_bytes" in h.metrics(run_id)


def test_fast_flow_test_failing_retries_then_fails(h: PipelineHarness) -> None:
    copy_fixtures(h.root, "test_failing")
    run_id = h.enqueue("test_failing")
    assert h.run(run_id, until_final=False) == "retrying"  # retry_attempts: 1
    assert h.run(run_id) == "failed"
    run = h.get(run_id)
    assert (run.attempt, run.error_type) == (2, "PipelineFailed")
    assert run.error is not None and "main.py exited with code 1" in run.error
    assert "failing because: deliberate" in run.error  # the stderr tail explains it
    assert h.lines(run_id, "stderr").count("failing because: deliberate") == 2


def test_fast_flow_test_logging_streams_both_streams(h: PipelineHarness) -> None:
    copy_fixtures(h.root, "test_logging")
    run_id = h.enqueue("test_logging")
    assert h.run(run_id) == "succeeded"  # warnings on stderr do not fail a run
    assert h.lines(run_id, "stdout")[:2] == ["stdout line 1 of 5", "stdout line 2 of 5"]
    err = h.lines(run_id, "stderr")
    assert err[0] == "INFO stderr line 1 of 5"
    assert err[-1] == "WARNING a warning on stderr does not fail the run"


def test_params_on_stdin_env_and_precedence(h: PipelineHarness) -> None:
    make_pipeline(
        h.root,
        "echo_env",
        textwrap.dedent(
            """
            import json, os, sys
            stdin = json.load(sys.stdin)
            names = ["LEVEL", "FROM_JSON", "ONLY_OVERRIDE", "count", "DATABASE_URL"]
            print(json.dumps({
                "stdin": stdin,
                "env_params": json.loads(os.environ["CONVEYOR_PARAMS"]),
                "env": {n: os.environ.get(n) for n in names},
                "worker_secret": os.environ.get("CONVEYOR_SECRET_KEY"),
            }))
            """
        ),
        {"default_env": {"LEVEL": "pipeline", "FROM_JSON": "j", "ONLY_OVERRIDE": "pipeline"}},
    )
    params = {"LEVEL": "param", "count": 3, "_env": {"ONLY_OVERRIDE": "run", "LEVEL": "run"}}
    run_id = h.enqueue("echo_env", params)
    os.environ["CONVEYOR_SECRET_KEY"] = "never-inherited"
    try:
        assert h.run(run_id) == "succeeded"
    finally:
        del os.environ["CONVEYOR_SECRET_KEY"]
    seen = json.loads(h.lines(run_id, "stdout")[0])
    assert seen["stdin"] == seen["env_params"] == {"LEVEL": "param", "count": 3}
    assert seen["env"] == {
        "LEVEL": "param",
        "FROM_JSON": "j",
        "ONLY_OVERRIDE": "run",
        "count": "3",
        "DATABASE_URL": None,
    }
    assert seen["worker_secret"] is None  # the worker's own environment stays out


def test_events_record_steps_metrics_cost_log_and_result(h: PipelineHarness) -> None:
    shutil.copytree(ROOT / "pipelines" / "report_artifacts", h.root / "report_artifacts")
    run_id = h.enqueue("report_artifacts", {"rows": 20})
    assert h.run(run_id) == "succeeded"
    run = h.get(run_id)
    assert run.result["result"]["rows"] == 20 and run.result["artifacts"] == ["report.csv"]
    assert h.steps(run_id) == [("generate", "completed", None), ("write report", "completed", None)]
    assert h.metrics(run_id)["rows"] == [20.0]
    with h.engine.connect() as conn:
        cost = conn.execute(select(CostEntry.__table__)).mappings().one()  # type: ignore[arg-type]
        assert str(conn.execute(select(runs.c.cost_usd)).scalar_one()).startswith("0.0005")
    assert (cost["provider"], cost["tokens_in"], cost["tokens_out"]) == ("example", 420, 36)
    assert ("log", "report written") in [(s, m) for s, m, _ in h.logs(run_id)]
    assert not any(m.startswith("::conveyor::") for m in h.lines(run_id))
    [artifact] = h.artifacts(run_id)
    data = Path(artifact["path"]).read_bytes()
    assert artifact["name"] == "report.csv" and artifact["size_bytes"] == len(data)
    assert artifact["sha256"] == hashlib.sha256(data).hexdigest()


def test_bad_events_are_kept_as_lines_and_open_steps_fail_with_the_run(h1: PipelineHarness) -> None:
    make_pipeline(
        h1.root,
        "bad_events",
        textwrap.dedent(
            """
            import sys
            print('::conveyor::{"event": "step", "name": "work"}')
            print('::conveyor::not json')
            print('::conveyor::{"event": "teleport"}')
            print('::conveyor::{"event": "metric", "name": "x", "value": "high"}')
            sys.exit(3)
            """
        ),
    )
    run_id = h1.enqueue("bad_events")
    assert h1.run(run_id) == "failed"
    assert h1.steps(run_id) == [("work", "failed", "PipelineStepFailed: the process ended")]
    kept = [(m, f["event_ignored"]) for s, m, f in h1.logs(run_id) if f and "event_ignored" in f]
    assert [m for m, _ in kept] == [
        "::conveyor::not json",
        '::conveyor::{"event": "teleport"}',
        '::conveyor::{"event": "metric", "name": "x", "value": "high"}',
    ]
    assert "unknown event 'teleport'" in kept[1][1]
    assert "exited with code 3" in (h1.get(run_id).error or "")


def test_a_10_mb_line_and_binary_output_are_stored_safely(h1: PipelineHarness) -> None:
    make_pipeline(
        h1.root,
        "noisy",
        textwrap.dedent(
            """
            import sys
            sys.stdout.write("x" * (10 * 1024 * 1024) + "\\n")
            sys.stdout.buffer.write(b"bytes \\xff\\xfe\\x00 end\\n")
            sys.stdout.buffer.write(bytes(range(256)))
            print("after")
            sys.stderr.write("no newline at the end")
            """
        ),
    )
    run_id = h1.enqueue("noisy")
    assert h1.run(run_id) == "succeeded"
    out = h1.lines(run_id, "stdout")
    assert len(out[0].encode()) < 70_000 and out[0].endswith("bytes]")
    assert "…[truncated" in out[0]
    assert out[1] == "bytes \ufffd\ufffd\\x00 end"
    assert out[-1].endswith("after")
    assert h1.lines(run_id, "stderr") == ["no newline at the end"]


def pids_in(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def stubborn_tree(root: Path, timeout: float | None) -> None:
    """main.py forks a child and a grandchild (in its own session); all ignore SIGTERM."""
    make_pipeline(
        root,
        "stubborn",
        textwrap.dedent(
            """
            import os, signal, sys, time
            def note():
                with open(os.environ["PIDS_FILE"], "a") as f:
                    f.write(f"{os.getpid()}\\n")
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if os.fork() == 0:
                if os.fork() == 0:
                    os.setsid()
                    note()
                    time.sleep(600)
                note()
                time.sleep(600)
            note()
            print("started", flush=True)
            time.sleep(600)
            """
        ),
        {"timeout": timeout} if timeout else None,
    )


def assert_all_dead(pids: list[int]) -> None:
    for pid in pids:
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            continue
        assert status == psutil.STATUS_ZOMBIE, f"process {pid} survived the run ({status})"


def test_timeout_kills_the_whole_process_tree(h1: PipelineHarness, tmp_path: Path) -> None:
    stubborn_tree(h1.root, timeout=1.5)
    pids = tmp_path / "pids"
    run_id = h1.enqueue("stubborn", {"PIDS_FILE": str(pids)})
    assert h1.run(run_id) == "timed_out"
    run = h1.get(run_id)
    assert run.error_type == "RunTimedOut"
    assert len(pids_in(pids)) == 3
    assert_all_dead(pids_in(pids))


def test_cancel_kills_the_whole_process_tree(h1: PipelineHarness, tmp_path: Path) -> None:
    from domain.db.unit_of_work import UnitOfWork
    from domain.runs import control

    stubborn_tree(h1.root, timeout=None)
    pids = tmp_path / "pids"
    run_id = h1.enqueue("stubborn", {"PIDS_FILE": str(pids)})
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(h1.run(run_id)))
    worker.start()
    eventually(lambda: len(pids_in(pids)) == 3, timeout=20, every=0.05)
    control.cancel_run(UnitOfWork(h1.engine), run_id, actor="test")
    worker.join(timeout=30)
    assert result == ["cancelled"]
    assert_all_dead(pids_in(pids))
    # The worker goes on: the next run of another pipeline is unaffected.
    copy_fixtures(h1.root, "test_simple")
    assert h1.run(h1.enqueue("test_simple")) == "succeeded"


def test_leftover_children_die_when_main_exits(h1: PipelineHarness, tmp_path: Path) -> None:
    make_pipeline(
        h1.root,
        "leaves_a_child",
        textwrap.dedent(
            """
            import os, signal, subprocess, sys
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                     stdout=subprocess.DEVNULL)
            open(os.environ["PIDS_FILE"], "w").write(str(child.pid))
            print("bye")
            """
        ),
    )
    pids = tmp_path / "pids"
    run_id = h1.enqueue("leaves_a_child", {"PIDS_FILE": str(pids)})
    assert h1.run(run_id) == "succeeded"
    assert_all_dead(pids_in(pids))


def test_memory_limit_kills_with_a_clear_error(h1: PipelineHarness) -> None:
    make_pipeline(
        h1.root,
        "hungry",
        "import time\nblob = b'x' * (200 * 1024 * 1024)\ntime.sleep(30)\n",
        {"mem_hard_limit": "64M", "mem_soft_limit": "32M", "timeout": 60},
    )
    run_id = h1.enqueue("hungry")
    assert h1.run(run_id) == "failed"
    run = h1.get(run_id)
    assert run.error_type == "PipelineMemoryExceeded"
    assert run.error is not None and "over its mem_hard_limit of 64 MiB" in run.error
    soft = [f for s, m, f in h1.logs(run_id) if s == "event" and f and f.get("soft_limit")]
    assert soft and soft[0]["soft_limit"] == "memory"


def test_cpu_hard_limit_throttles(h1: PipelineHarness) -> None:
    make_pipeline(
        h1.root,
        "busy",
        "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end:\n    pass\n",
        {"cpu_hard_limit": 0.25},
    )
    run_id = h1.enqueue("busy")
    assert h1.run(run_id) == "succeeded"
    assert h1.metrics(run_id)["cpu_throttled_s"][0] > 0


def test_downstream_triggers_start_one_follow_up(h: PipelineHarness) -> None:
    copy_fixtures(h.root, "test_simple", "test_failing")
    make_pipeline(
        h.root,
        "chained",
        "print('first')\n",
        {
            "downstream_triggers": [
                {"pipeline": "test_simple"},
                {"pipeline": "test_failing", "on_success": False},
            ]
        },
    )
    run_id = h.enqueue("chained")
    assert h.run(run_id) == "succeeded"
    with h.engine.connect() as conn:
        children = conn.execute(
            select(runs.c.name, runs.c.triggered_by, runs.c.kind).where(
                runs.c.parent_run_id == run_id
            )
        ).all()
    assert [tuple(c) for c in children] == [("test_simple", "chain", "pipeline")]


def test_disabled_invalid_and_unknown_pipelines_fail_without_retry(h: PipelineHarness) -> None:
    make_pipeline(h.root, "off", "print(1)\n", {"enabled": False, "retry_attempts": 3})
    with pytest.raises(InvalidInput, match="'off' is disabled"):
        h.enqueue("off")
    with pytest.raises(InvalidInput, match="name: "):
        h.enqueue("../off")
    with pytest.raises(UnknownTask):  # never a path: names are looked up among the folders
        h.runner.directory.get("../off")
    make_pipeline(h.root, "later_broken", "print(1)\n", {"retry_attempts": 3})
    run_id = h.enqueue("later_broken")
    (h.root / "later_broken" / "pipeline.json").write_text('{"timeout": -1}')
    assert h.run(run_id) == "failed"
    run = h.get(run_id)
    assert (run.error_type, run.attempt) == ("PipelineDisabled", 1)
    assert "key 'timeout': expected a number of seconds >= 0" in (run.error or "")


def test_missing_interpreter_is_a_clear_error(h1: PipelineHarness) -> None:
    make_pipeline(h1.root, "old_python", "print(1)\n", {"python_version": "2.1"})
    run_id = h1.enqueue("old_python")
    assert h1.run(run_id) == "failed"
    run = h1.get(run_id)
    assert run.error_type == "InterpreterNotFound"
    error = run.error or ""
    assert "\n" not in error  # one line: what was asked, and what this worker has
    assert error.startswith("python_version '2.1': no such interpreter on this worker")
    assert f"it has Python {'.'.join(map(str, sys.version_info[:2]))}." in error


def test_a_pipeline_with_requirements_runs_in_its_uv_environment(h: PipelineHarness) -> None:
    copy_fixtures(h.root, "test_with_requirements")
    sync(h.engine, h.runner.directory)
    run_id = h.enqueue("test_with_requirements")
    assert h.run(run_id) == "succeeded"
    out = h.lines(run_id, "stdout")
    assert out[0] == "six 1.17.0" and out[-1] == "hello from a uv environment"
    prefix = out[1].removeprefix("prefix ")
    assert Path(prefix).parent == h.runner.envs.cache_dir


def test_a_requirement_that_does_not_resolve_fails_with_uvs_message(h1: PipelineHarness) -> None:
    make_pipeline(
        h1.root, "unresolvable", "print(1)\n", requirements="conveyor-no-such-package-xyz==1.0\n"
    )
    run_id = h1.enqueue("unresolvable")
    assert h1.run(run_id) == "failed"
    run = h1.get(run_id)
    assert run.error_type == "PipelineEnvError"
    assert "conveyor-no-such-package-xyz" in (run.error or "")
    assert any(line.startswith("uv: ") for line in h1.lines(run_id, "log"))


def test_the_example_pipelines_without_secrets_run(h1: PipelineHarness) -> None:
    for name in ("greeting", "humanize_sizes"):
        shutil.copytree(ROOT / "pipelines" / name, h1.root / name)
    hello = h1.enqueue("greeting", {"name": "conveyor"})
    assert h1.run(hello) == "succeeded"
    assert h1.lines(hello, "stdout")[0] == "Hello, conveyor!"
    sizes = h1.enqueue("humanize_sizes", {"sizes": [2048]})
    assert h1.run(sizes) == "succeeded"
    assert h1.lines(sizes, "stdout")[0] == "        2048 bytes = 2.0 KiB"


def test_a_relative_pipelines_dir_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default CONVEYOR_PIPELINES_DIR is ./pipelines: relative to where conveyor starts."""
    from domain.pipelines.discovery import PipelineDirectory

    (tmp_path / "pipelines" / "rel").mkdir(parents=True)
    (tmp_path / "pipelines" / "rel" / "main.py").write_text("print('ok')\n")
    monkeypatch.chdir(tmp_path)
    directory = PipelineDirectory(Path("pipelines"))
    assert directory.root == tmp_path / "pipelines"
    assert directory.get("rel").path.is_absolute()
