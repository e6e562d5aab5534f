"""Fast-Flow's legacy `webhook_key` trigger: off by default, exact when on, and silent about
which pipelines exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.conftest import running_api


def make_pipelines(root: Path) -> None:
    (root / "ingest").mkdir(parents=True)
    (root / "ingest" / "main.py").write_text("print('ingest')\n")
    (root / "ingest" / "pipeline.json").write_text('{"webhook_key": "k3y-from-fastflow"}')


def test_off_unless_enabled(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_pipelines(tmp_path)
    monkeypatch.setenv("CONVEYOR_PIPELINES_DIR", str(tmp_path))
    with running_api(db_url) as api:
        reply = api.post("/hooks/pipelines/ingest/k3y-from-fastflow", json={})
    assert reply.status_code == 404
    assert reply.json()["error"]["message"] == "No pipeline webhook at this address."


def test_enabled_key_in_the_url_starts_the_pipeline(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_pipelines(tmp_path)
    monkeypatch.setenv("CONVEYOR_PIPELINES_DIR", str(tmp_path))
    monkeypatch.setenv("CONVEYOR_PIPELINE_LEGACY_WEBHOOKS", "true")
    with running_api(db_url) as api:
        first = api.post(
            "/hooks/pipelines/ingest/k3y-from-fastflow",
            json={"day": "2026-11-24"},
            headers={"X-Conveyor-Delivery": "d-1"},
        )
        again = api.post(
            "/hooks/pipelines/ingest/k3y-from-fastflow",
            json={"day": "2026-11-24"},
            headers={"X-Conveyor-Delivery": "d-1"},
        )
        wrong = api.post("/hooks/pipelines/ingest/not-the-key", json={})
        unknown = api.post("/hooks/pipelines/nope/k3y-from-fastflow", json={})
        run = api.as_role("readonly", "GET", f"/api/v1/runs/{first.json()['run_id']}").json()
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["run_id"] == again.json()["run_id"]
    assert (wrong.status_code, unknown.status_code) == (404, 404)
    assert wrong.json() == unknown.json()  # a wrong key says nothing about the pipeline
    assert (run["name"], run["kind"], run["triggered_by"], run["params"]) == (
        "ingest",
        "pipeline",
        "webhook",
        {"day": "2026-11-24"},
    )
