"""Downloading a run's artifacts from the API and the dashboard: the recorded file's bytes as
an attachment, and nothing else: not a name that climbs out of the run's folder, not a link
swapped in after the run, not a file changed since it was recorded."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import update

from domain.db.models import RunArtifact
from domain.pipelines.store import record_artifacts
from tests.api.conftest import ApiClient, create_run, error_of, running_api
from tests.api.pages import table
from tests.api.test_dashboard import browser
from worker.pipelines.artifacts import collect_artifacts


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[tuple[ApiClient, Path]]:
    root = tmp_path / "artifacts"
    with running_api(db_url, settings={"artifacts_root": root}) as client:
        yield client, root


def a_run_with_files(api: ApiClient, root: Path, files: dict[str, bytes]) -> str:
    """A run whose folder holds `files`, recorded as the worker records them."""
    run_id = create_run(api)["id"]
    folder = root / run_id
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    items = collect_artifacts(folder)
    record_artifacts(api.state.engine, uuid.UUID(run_id), items, now=datetime.now(UTC))
    return run_id


def test_an_artifact_downloads_as_an_attachment_with_its_checksum(
    served: tuple[ApiClient, Path],
) -> None:
    api, root = served
    html, csv, accent = b"<script>alert(1)</script>", b"a,b\n1,2\n", "r\u00e9sum\u00e9.txt"
    run_id = a_run_with_files(api, root, {"report.csv": csv, "out/page.html": html, accent: b"x"})
    base = f"/api/v1/runs/{run_id}/artifacts"
    got = api.as_role("readonly", "GET", f"{base}/report.csv")
    assert got.status_code == 200 and got.content == csv
    assert got.headers["content-disposition"] == 'attachment; filename="report.csv"'
    assert got.headers["etag"] == f'"{hashlib.sha256(csv).hexdigest()}"'
    page = api.as_role("readonly", "GET", f"{base}/out/page.html")
    # HTML is sent as opaque bytes that a browser neither renders nor sniffs.
    assert page.content == html
    assert page.headers["content-type"] == "application/octet-stream"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in page.headers["content-security-policy"]
    assert page.headers["content-disposition"] == 'attachment; filename="page.html"'
    accented = api.as_role("readonly", "GET", f"{base}/{quote(accent)}")
    assert accented.content == b"x"
    assert "filename*=utf-8''r%C3%A9sum%C3%A9.txt" in accented.headers["content-disposition"]
    ranged = api.as_role("readonly", "GET", f"{base}/report.csv", headers={"Range": "bytes=4-"})
    assert ranged.status_code == 206 and ranged.content == b"1,2\n"
    assert api.get(f"{base}/report.csv").status_code == 401


def test_unknown_names_and_runs_are_404s_that_say_which(served: tuple[ApiClient, Path]) -> None:
    api, root = served
    run_id = a_run_with_files(api, root, {"report.csv": b"1"})
    base = f"/api/v1/runs/{run_id}/artifacts"
    other = api.as_role("readonly", "GET", f"{base}/nope.csv")
    assert other.status_code == 404 and error_of(other)["type"] == "artifact_not_found"
    assert "no artifact named 'nope.csv'" in error_of(other)["message"]
    missing = api.as_role("readonly", "GET", f"/api/v1/runs/{uuid.uuid4()}/artifacts/report.csv")
    assert missing.status_code == 404 and error_of(missing)["type"] == "run_not_found"


def test_a_name_or_path_leading_out_of_the_runs_folder_is_never_served(
    served: tuple[ApiClient, Path], tmp_path: Path
) -> None:
    api, root = served
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"do not serve")
    run_id = a_run_with_files(api, root, {"report.csv": b"12345", "link.txt": b"12345"})
    rid = uuid.UUID(run_id)
    base = f"/api/v1/runs/{run_id}/artifacts"
    with api.state.engine.begin() as conn:
        table_ = RunArtifact.__table__
        # A row edited to name a file outside the folder, and a path column pointing anywhere.
        conn.execute(
            update(table_)
            .where(table_.c.run_id == rid, table_.c.name == "report.csv")
            .values(name="../../secret.txt", path=str(secret), size_bytes=12)
        )
    climbed = api.as_role("readonly", "GET", f"{base}/..%2F..%2Fsecret.txt")
    assert climbed.status_code == 404, climbed.text
    assert error_of(climbed)["type"] == "artifact_unavailable"
    assert b"do not serve" not in climbed.content
    # A link swapped in after the run, to a file of the recorded size outside the folder.
    (root / run_id / "link.txt").unlink()
    (root / run_id / "link.txt").symlink_to(secret)
    secret.write_bytes(b"12345")
    linked = api.as_role("readonly", "GET", f"{base}/link.txt")
    assert linked.status_code == 404 and error_of(linked)["type"] == "artifact_unavailable"
    assert b"12345" not in linked.content


def test_a_changed_or_removed_file_is_refused_with_its_reason(
    served: tuple[ApiClient, Path],
) -> None:
    api, root = served
    run_id = a_run_with_files(api, root, {"a.txt": b"four", "b.txt": b"gone"})
    base = f"/api/v1/runs/{run_id}/artifacts"
    (root / run_id / "a.txt").write_bytes(b"rewritten after the run")
    changed = api.as_role("readonly", "GET", f"{base}/a.txt")
    assert changed.status_code == 409 and error_of(changed)["type"] == "artifact_changed"
    assert "23 bytes on disk, not the 4 the run recorded" in error_of(changed)["message"]
    (root / run_id / "b.txt").unlink()
    removed = api.as_role("readonly", "GET", f"{base}/b.txt")
    assert removed.status_code == 404 and error_of(removed)["type"] == "artifact_unavailable"
    assert "not shared with this server, or the file was removed" in error_of(removed)["message"]


def test_the_run_page_links_each_artifact_to_its_download(served: tuple[ApiClient, Path]) -> None:
    api, root = served
    run_id = a_run_with_files(api, root, {"out/report.csv": b"a,b\n"})
    with browser(api, "readonly") as reader:
        page = reader.get(f"/runs/{run_id}").text
        [(_, row)] = table(page, "artifacts")
        assert row[0] == "out/report.csv"
        href = f'href="/runs/{run_id}/artifacts/out/report.csv"'
        assert href in page
        got = reader.get(f"/runs/{run_id}/artifacts/out/report.csv")
        assert got.status_code == 200 and got.content == b"a,b\n"
        assert got.headers["content-disposition"] == 'attachment; filename="report.csv"'
    with browser(api) as anonymous:
        refused = anonymous.get(f"/runs/{run_id}/artifacts/out/report.csv")
        assert refused.status_code == 303 and refused.headers["location"].startswith("/login")
