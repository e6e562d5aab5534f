"""Notebook pipelines through the real executor: cells in order, in the pipeline's own uv
environment, retried in the same kernel, a failed cell named, the executed notebook kept, and
the kernel killed with the run."""

from __future__ import annotations

import json
import shutil
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.integration.test_pipelines_runner import assert_all_dead, pids_in
from tests.pipeline_support import (
    ROOT,
    PipelineHarness,
    make_notebook,
    shared_env_cache,
    sqlite_pipeline_harness,
    tmp_pipeline_harness,
)
from tests.polling import eventually
from worker.pipelines.envs import EnvManager, PipelineEnvError
from worker.pipelines.notebooks import NOTEBOOK_PACKAGES

pytestmark = pytest.mark.slow

#: uv's words when the packages are not to be had at all (no index, no network): the one case
#: in which these tests skip rather than fail.
_UNAVAILABLE = ("No solution found", "Failed to fetch", "not found in the package registry")


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The notebook environment, built once (into the cache every harness shares)."""
    cache = shared_env_cache(tmp_path_factory)
    try:
        EnvManager(cache, timeout_s=300).ensure(
            None, None, log=lambda m, level="info": None, packages=NOTEBOOK_PACKAGES
        )
    except PipelineEnvError as exc:
        if any(words in str(exc) for words in _UNAVAILABLE):
            pytest.skip(
                "uv cannot install ipykernel, nbclient and nbformat from this machine's "
                f"package index: {exc}"
            )
        raise


@pytest.fixture
def h(
    engine: Engine, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, notebook_env: None
) -> Iterator[PipelineHarness]:
    """On SQLite and PostgreSQL."""
    with tmp_pipeline_harness(engine, tmp_path, tmp_path_factory) as harness:
        yield harness


@pytest.fixture
def h1(
    sqlite_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, notebook_env: None
) -> Iterator[PipelineHarness]:
    """SQLite only: for tests about processes rather than the database."""
    with sqlite_pipeline_harness(sqlite_url, tmp_path, tmp_path_factory) as harness:
        yield harness


def executed(h: PipelineHarness, run_id: object) -> dict[str, object]:
    """The executed notebook stored with the run."""
    stored = {a["name"]: a for a in h.artifacts(run_id)}  # type: ignore[arg-type]
    assert "main.ipynb" in stored, stored
    notebook: dict[str, object] = json.loads(Path(stored["main.ipynb"]["path"]).read_text())
    return notebook


def outputs(cell: object) -> list[str]:
    """A code cell's outputs as text: stream text, text/plain, or ename: evalue."""
    found = []
    for out in cell["outputs"]:  # type: ignore[index]
        if out["output_type"] == "stream":
            found.append("".join(out["text"]))
        elif out["output_type"] == "error":
            found.append(f"{out['ename']}: {out['evalue']}")
        else:
            found.append("".join(out["data"]["text/plain"]))
    return found


def test_cells_run_in_order_and_stream_into_the_runs_logs(h: PipelineHarness) -> None:
    make_notebook(
        h.root,
        "report",
        [
            ("markdown", "# A report\nnot code: not counted"),
            "import sys\nprint('first')\nprint('second, in', end=' ')\nprint('two writes')",
            "sys.stderr.write('a warning\\n')\nprint(sys.prefix)",
            "",  # empty: counted, nothing to run
            "6 * 7",
        ],
        {"description": "cells in order"},
    )
    run_id = h.enqueue("report")
    assert h.get(run_id).max_attempts == 1
    assert h.run(run_id) == "succeeded"
    out = h.lines(run_id, "stdout")
    assert out[:3] == ["[cell 0] first", "[cell 0] second, in two writes", out[2]]
    assert out[3:] == ["[cell 3] 42"]
    # The kernel ran in the pipeline's own uv environment, not in conveyor's.
    prefix = Path(out[2].removeprefix("[cell 1] "))
    assert prefix.parent == h.runner.envs.cache_dir
    assert h.lines(run_id, "stderr") == ["[cell 1] a warning"]
    assert [(name, status) for name, status, _ in h.steps(run_id)] == [
        ("cell 0", "completed"),
        ("cell 1", "completed"),
        ("cell 3", "completed"),
    ]
    run = h.get(run_id)
    assert run.result == {"exit_code": 0, "result": None, "artifacts": ["main.ipynb"]}
    env_event = next(f for s, m, f in h.logs(run_id) if m == "pipeline environment")
    assert env_event["requirements_hash"] is not None  # a uv environment, though no requirements
    cells = executed(h, run_id)["cells"]
    assert [c["cell_type"] for c in cells] == ["markdown", "code", "code", "code", "code"]  # type: ignore[attr-defined]
    assert outputs(cells[1]) == ["first\nsecond, in two writes\n"]  # type: ignore[index]
    assert outputs(cells[4]) == ["42"]  # type: ignore[index]


def test_a_failing_cell_is_retried_in_the_same_kernel(h: PipelineHarness) -> None:
    make_notebook(
        h.root,
        "flaky",
        [
            "tries = 0",
            # Fails twice, then passes: `tries` lives on only if each attempt is the same kernel.
            "tries += 1\nif tries < 3:\n    raise RuntimeError(f'flaky {tries}')\n"
            "print('ok', tries)",
            # Its own metadata (Fast-Flow's key) wins over cells[2]: one retry, no delay.
            (
                "code",
                "if tries == 3:\n    tries += 1\n    raise KeyError('once')\nprint('ok', tries)",
                {"fastflow": {"retries": 1, "delay_seconds": 0}},
            ),
        ],
        {"cells": [{}, {"retries": 2, "delay_seconds": 0.2}, {"retries": 0}]},
    )
    run_id = h.enqueue("flaky")
    assert h.run(run_id) == "succeeded"
    assert h.get(run_id).attempt == 1  # retried cell by cell, not as a new run attempt
    assert h.lines(run_id, "stdout") == ["[cell 1] ok 3", "[cell 2] ok 4"]
    retries = [(m, f) for s, m, f in h.logs(run_id) if s == "log" and m.startswith("cell ")]
    assert [m for m, _ in retries] == [
        "cell 1: attempt 1 of 3 failed (RuntimeError: flaky 1); retrying in 0.2s",
        "cell 1: attempt 2 of 3 failed (RuntimeError: flaky 2); retrying in 0.2s",
        "cell 2: attempt 1 of 2 failed (KeyError: 'once'); retrying in 0s",
    ]
    assert retries[0][1] == {"cell": 1, "attempt": 1, "retry_in_s": 0.2}
    errors = h.lines(run_id, "stderr")
    assert sum(line.startswith("[cell 1] RuntimeError: flaky") for line in errors) == 2
    assert [status for _, status, _ in h.steps(run_id)] == ["completed"] * 3


def test_a_cell_that_keeps_failing_fails_the_run_naming_the_cell(h: PipelineHarness) -> None:
    make_notebook(
        h.root,
        "broken",
        [
            ("markdown", "intro"),
            "print('loaded')",
            "def load(n):\n    raise ValueError(f'bad input {n}')\n\nload(7)",
            "print('never runs')",
        ],
        {"cells": [{}, {"retries": 1, "delay_seconds": 0}], "retry_attempts": 3},
    )
    run_id = h.enqueue("broken")
    assert h.run(run_id) == "failed"
    run = h.get(run_id)
    assert (run.attempt, run.error_type, run.exit_code) == (1, "NotebookFailed", 1)
    error = run.error or ""
    assert error.startswith(
        "main.ipynb: code cell 1 (cell 2 of the notebook) failed after 2 attempt(s): "
        "ValueError: bad input 7\n"
    ), error
    assert "Traceback (most recent call last)" in error
    assert "----> 4 load(7)" in error and "raise ValueError(f'bad input {n}')" in error
    assert "\x1b[" not in error  # the kernel's colours are gone
    assert "executor.py" not in error  # the report, not the worker's own traceback
    assert "never runs" not in "\n".join(h.lines(run_id))
    assert [(name, status) for name, status, _ in h.steps(run_id)] == [
        ("cell 0", "completed"),
        ("cell 1", "failed"),
    ]
    cells = executed(h, run_id)["cells"]
    assert outputs(cells[1]) == ["loaded\n"]  # type: ignore[index]
    assert outputs(cells[2]) == ["ValueError: bad input 7"]  # type: ignore[index]
    assert outputs(cells[3]) == []  # type: ignore[index]


def test_the_example_notebook_runs(h1: PipelineHarness) -> None:
    shutil.copytree(ROOT / "pipelines" / "notebook_cells", h1.root / "notebook_cells")
    run_id = h1.enqueue("notebook_cells", {"text": "to be or not to be"})
    assert h1.run(run_id) == "succeeded"
    assert h1.lines(run_id, "stdout") == [
        "[cell 0] 6 words",
        "[cell 1] [('to', 2), ('be', 2), ('or', 1)]",
        "[cell 2] wrote counts.json",
    ]
    assert sorted(a["name"] for a in h1.artifacts(run_id)) == ["counts.json", "main.ipynb"]


def test_requirements_and_the_kernel_share_one_environment(h1: PipelineHarness) -> None:
    folder = make_notebook(h1.root, "with_six", ["import six\nprint('six', six.__version__)"])
    (folder / "requirements.txt").write_text("six==1.17.0\n")
    run_id = h1.enqueue("with_six")
    assert h1.run(run_id) == "succeeded"
    assert h1.lines(run_id, "stdout") == ["[cell 0] six 1.17.0"]


def test_a_kernel_that_dies_fails_the_run_naming_the_cell(h1: PipelineHarness) -> None:
    make_notebook(h1.root, "dies", ["print('alive')", "import os\nos._exit(3)", "print('after')"])
    run_id = h1.enqueue("dies")
    assert h1.run(run_id) == "failed"
    error = h1.get(run_id).error or ""
    assert error.startswith("main.ipynb: the kernel died in code cell 1 (cell 1 of the notebook)")
    assert h1.lines(run_id, "stdout") == ["[cell 0] alive"]


def test_bad_cell_metadata_fails_before_any_cell_runs(h1: PipelineHarness) -> None:
    make_notebook(
        h1.root,
        "bad_meta",
        ["print('would run')", ("code", "print(2)", {"fastflow": {"retries": "three"}})],
    )
    run_id = h1.enqueue("bad_meta")
    assert h1.run(run_id) == "failed"
    assert h1.get(run_id).error == (
        "main.ipynb: code cell 1 (cell 1 of the notebook): metadata.fastflow.retries: "
        "expected a whole number from 0 to 99; got 'three'"
    )
    assert h1.lines(run_id, "stdout") == []


SLEEPER = textwrap.dedent(
    """
    import os, subprocess
    child = subprocess.Popen(["sleep", "600"])
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{os.getppid()}\\n{os.getpid()}\\n{child.pid}\\n")
    import time
    time.sleep(600)
    """
)


@pytest.mark.parametrize("stop", ["cancel", "timeout"])
def test_cancel_and_timeout_kill_the_kernel_and_its_children(
    h1: PipelineHarness, tmp_path: Path, stop: str
) -> None:
    from domain.db.unit_of_work import UnitOfWork
    from domain.runs import control

    make_notebook(
        h1.root,
        "sleeper",
        ["print('before the sleep')", SLEEPER],
        {"timeout": 8} if stop == "timeout" else None,
    )
    pids = tmp_path / "pids"
    run_id = h1.enqueue("sleeper", {"PIDS_FILE": str(pids)})
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(h1.run(run_id)))
    worker.start()
    # The notebook runner, its kernel, and the cell's own child process.
    eventually(lambda: len(pids_in(pids)) == 3, timeout=30, every=0.05)
    if stop == "cancel":
        control.cancel_run(UnitOfWork(h1.engine), run_id, actor="test")
    worker.join(timeout=60)
    assert result == ["cancelled" if stop == "cancel" else "timed_out"]
    assert_all_dead(pids_in(pids))
    # The notebook as it was when the run stopped: the cells that had finished.
    cells = executed(h1, run_id)["cells"]
    assert outputs(cells[0]) == ["before the sleep\n"]  # type: ignore[index]
    assert outputs(cells[1]) == []  # type: ignore[index]
