"""Discovery of pipeline folders, the catalog, and the pipelines table (both databases)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, InvalidInput, UnknownTask
from domain.pipelines.discovery import (
    PipelineCatalog,
    PipelineDirectory,
    PipelineDisabled,
    discover,
    pipeline_settings,
)
from domain.pipelines.store import list_rows, record_outcome, sync
from domain.runs import enqueue
from domain.runs.requests import build_request
from domain.tasks.catalog import CompositeCatalog
from domain.tasks.registry import Registry, RegistryCatalog
from tests.pipeline_support import copy_fixtures, make_pipeline


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Fast-Flow's fixtures plus every kind of bad folder."""
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    copy_fixtures(pipelines, "test_simple", "test_failing", "test_logging")
    make_pipeline(pipelines, "typo_key", "print(1)\n", {"timout": 5, "description": "typo"})
    make_pipeline(pipelines, "negative", "print(1)\n", {"timeout": -5})
    make_pipeline(pipelines, "bad_json", "print(1)\n", '{"timeout": 5,')
    make_pipeline(pipelines, "off", "print(1)\n", {"enabled": False})
    make_pipeline(pipelines, "bad name", "print(1)\n")
    (pipelines / "no_main").mkdir()
    (pipelines / "no_main" / "pipeline.json").write_text("{}")
    (pipelines / "just_data").mkdir()
    (pipelines / "just_data" / "rows.csv").write_text("a,b\n")
    (pipelines / ".hidden").mkdir()
    (pipelines / ".hidden" / "main.py").write_text("print(1)\n")
    (pipelines / "README.md").write_text("not a folder")
    alt = make_pipeline(pipelines, "alt_name", "print(1)\n")
    (alt / "alt_name.json").write_text(json.dumps({"description": "Fast-Flow's <name>.json"}))
    locked = make_pipeline(pipelines, "locked", "print(1)\n", requirements="six\n")
    (locked / "requirements.txt.lock").write_text("six==1.17.0\n")
    make_pipeline(pipelines, "comments_only", "print(1)\n", requirements="# nothing\n\n")
    return pipelines


def by_name(root: Path) -> dict[str, object]:
    return {p.name: p for p in discover(root)}


def test_discovery_lists_good_and_bad_folders(root: Path) -> None:
    found = discover(root)
    assert [p.name for p in found] == [
        "alt_name",
        "bad name",
        "bad_json",
        "comments_only",
        "locked",
        "negative",
        "no_main",
        "off",
        "test_failing",
        "test_logging",
        "test_simple",
        "typo_key",
    ]
    p = {x.name: x for x in found}
    assert p["test_simple"].runnable and p["test_simple"].warnings == ()
    assert p["typo_key"].runnable
    assert p["typo_key"].warnings == (
        "pipelines/typo_key/pipeline.json: unknown key 'timout' is ignored "
        "(did you mean 'timeout'?)",
    )
    assert p["negative"].error == (
        "pipelines/negative/pipeline.json: key 'timeout': expected a number of seconds >= 0 "
        "(0 = no timeout); got -5"
    )
    assert (p["bad_json"].error or "").startswith("pipelines/bad_json/pipeline.json: invalid JSON")
    assert p["no_main"].error == "pipelines/no_main: no main.py in the folder"
    assert "not a valid pipeline name" in (p["bad name"].error or "")
    assert p["off"].status == "disabled" and p["off"].error is None
    assert p["alt_name"].config.description == "Fast-Flow's <name>.json"  # type: ignore[union-attr]
    assert p["locked"].requirements.name == "requirements.txt.lock"  # type: ignore[union-attr]
    assert p["comments_only"].requirements is None


def test_notebook_folders_need_their_main_ipynb(tmp_path: Path) -> None:
    root = tmp_path / "pipelines"
    notebook = json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
    for name, files in {
        "nb": {"main.ipynb": notebook, "pipeline.json": '{"type": "notebook"}'},
        "nb_missing": {"main.py": "print(1)\n", "pipeline.json": '{"type": "notebook"}'},
        "nb_broken": {"main.ipynb": "{not json", "pipeline.json": '{"type": "notebook"}'},
        "nb_untyped": {"main.ipynb": notebook},
    }.items():
        (root / name).mkdir(parents=True)
        for fname, text in files.items():
            (root / name / fname).write_text(text)
    p = {x.name: x for x in discover(root)}
    assert p["nb"].runnable and p["nb"].is_notebook
    assert p["nb"].entrypoint == root / "nb" / "main.ipynb"
    assert p["nb"].defaults.max_attempts == 1
    assert p["nb_missing"].error == (
        'pipelines/nb_missing: no main.ipynb in the folder ("type": "notebook" in pipeline.json)'
    )
    assert (p["nb_broken"].error or "").startswith(
        "pipelines/nb_broken/main.ipynb: not a notebook (invalid JSON"
    )
    assert p["nb_untyped"].error == (
        "pipelines/nb_untyped: no main.py in the folder "
        '(to run main.ipynb, set "type": "notebook" in pipeline.json)'
    )


def test_sync_on_both_databases(engine: Engine, root: Path) -> None:
    directory = PipelineDirectory(root)
    first = sync(engine, directory)
    assert "test_simple" in first.added and first.updated == []
    assert set(first.invalid) == {"bad name", "bad_json", "negative", "no_main"}
    rows = {r["name"]: r for r in list_rows(engine)}
    assert rows["negative"]["enabled"] is False and "key 'timeout'" in rows["negative"]["error"]
    assert rows["typo_key"]["warnings"] == [
        "pipelines/typo_key/pipeline.json: unknown key 'timout' is ignored "
        "(did you mean 'timeout'?)"
    ]
    assert rows["test_simple"]["tags"] == ["test", "simple"]
    assert rows["test_simple"]["config"]["default_env"]["TEST_ENV_VAR"] == "from_pipeline_json"

    with engine.begin() as conn:
        for status, trigger in [
            ("succeeded", "api"),
            ("failed", "webhook"),
            ("timed_out", "schedule"),
            ("cancelled", "cli"),
        ]:
            record_outcome(conn, "test_simple", status, trigger)
    (root / "negative" / "pipeline.json").write_text('{"timeout": 5}')
    os.rename(root / "test_simple", root.parent / "moved_away")
    second = sync(engine, directory)
    assert second.missing == ["test_simple"] and "negative" not in second.invalid
    rows = {r["name"]: r for r in list_rows(engine)}
    assert rows["negative"]["enabled"] is True and rows["negative"]["error"] is None
    gone = rows["test_simple"]
    assert gone["enabled"] is False and "folder is gone" in gone["error"]
    counters = [gone[k] for k in ("total_runs", "successful_runs", "failed_runs", "webhook_runs")]
    assert counters == [4, 1, 2, 1]  # kept across syncs


def test_catalog_resolves_pipelines_for_enqueue(engine: Engine, root: Path) -> None:
    directory = PipelineDirectory(root)
    catalog = CompositeCatalog(RegistryCatalog(Registry()), PipelineCatalog(directory, engine))
    defaults, params = catalog.resolve("test_failing", {"a": 1})
    assert (defaults.kind, defaults.max_attempts, defaults.timeout_s) == ("pipeline", 2, 30)
    assert params == {"a": 1}
    with pytest.raises(UnknownTask):
        catalog.resolve("nope", {})
    with pytest.raises(PipelineDisabled, match="'negative' is disabled: pipelines/negative"):
        catalog.resolve("negative", {})
    with pytest.raises(PipelineDisabled, match='"enabled": false'):
        catalog.resolve("off", {})
    with pytest.raises(InvalidInput, match=r"params\._env"):
        catalog.resolve("test_simple", {"_env": "A=1"})

    run = enqueue.enqueue(
        UnitOfWork(engine), build_request(name="test_simple", params={"x": 1}), catalog=catalog
    ).run
    assert (run.kind, run.max_attempts, run.timeout_s, run.queue) == ("pipeline", 3, 60, "default")


def test_max_instances_refuses_a_new_run(engine: Engine, tmp_path: Path) -> None:
    make_pipeline(tmp_path, "single", "print(1)\n", {"max_instances": 1, "queue": "etl"})
    catalog = PipelineCatalog(PipelineDirectory(tmp_path), engine)
    first = enqueue.enqueue(UnitOfWork(engine), build_request(name="single"), catalog=catalog)
    assert first.run.queue == "etl"
    with pytest.raises(Conflict, match="max_instances is 1"):
        enqueue.enqueue(UnitOfWork(engine), build_request(name="single"), catalog=catalog)


def test_directory_notices_changes(tmp_path: Path) -> None:
    directory = PipelineDirectory(tmp_path)
    assert directory.all() == []
    folder = make_pipeline(tmp_path, "fresh", "print(1)\n")
    assert [p.name for p in directory.all()] == ["fresh"]
    time.sleep(0.01)  # a new mtime, even on coarse-grained filesystems
    (folder / "pipeline.json").write_text('{"timeout": -1}')
    assert directory.get("fresh").error is not None
    with pytest.raises(UnknownTask, match="pipelines in"):
        directory.get("../fresh")


def test_settings_fall_back_to_the_environment(tmp_path: Path) -> None:
    class Bare:
        home = tmp_path

    ps = pipeline_settings(Bare(), {"CONVEYOR_PIPELINES_DIR": "/srv/p"})
    assert ps.pipelines_dir == Path("/srv/p")
    assert (ps.cache_dir, ps.artifacts_root) == (tmp_path / "envs", tmp_path / "artifacts")
    assert pipeline_settings(Bare(), {}).pipelines_dir == Path("pipelines")
