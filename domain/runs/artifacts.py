"""A run's artifacts: the files a pipeline left in its artifacts folder, as recorded (name,
path, size, sha256), and the recorded file itself for a download.

The bytes stay where the worker wrote them (`<artifacts root>/<run id>/...`); the database keeps
where and what. A download serves only a regular file inside this process's artifacts root, in
the run's own folder, whose size is still the recorded one: a name or a symlink that leads
out of that folder, or a file rewritten since the run, is refused, not served.
"""

from __future__ import annotations

import os
import stat
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Table, select

from domain.db.models import RunArtifact
from domain.db.unit_of_work import UnitOfWork
from domain.errors import Conflict, NotFound
from domain.runs.views import jsonable_fields

run_artifacts = cast(Table, RunArtifact.__table__)

_COLUMNS = (
    run_artifacts.c.name,
    run_artifacts.c.path,
    run_artifacts.c.size_bytes,
    run_artifacts.c.sha256,
    run_artifacts.c.created_at,
)


class ArtifactNotFound(NotFound):
    """The run has no artifact by this name."""


class ArtifactUnavailable(NotFound):
    """The artifact is recorded, but its file is not on this server."""


class ArtifactChanged(Conflict):
    """The artifact's file is no longer the one the run recorded."""


@dataclass(frozen=True, slots=True)
class ArtifactView:
    name: str
    path: str
    size_bytes: int
    sha256: str
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return jsonable_fields(self)


def listed(conn: Connection, run_id: uuid.UUID) -> list[ArtifactView]:
    """The run's artifacts by name (the run's existence is the caller's to check)."""
    stmt = select(*_COLUMNS).where(run_artifacts.c.run_id == run_id).order_by(run_artifacts.c.name)
    return [ArtifactView(**row) for row in conn.execute(stmt).mappings()]


def run_artifact_list(uow: UnitOfWork, run_id: uuid.UUID) -> list[ArtifactView]:
    """The run's artifacts by name; RunNotFound when there is no such run."""
    with uow:
        uow.runs.get(run_id)
        return listed(uow.conn, run_id)


def recorded(uow: UnitOfWork, run_id: uuid.UUID, name: str) -> ArtifactView:
    """One artifact's record; RunNotFound or ArtifactNotFound."""
    stmt = select(*_COLUMNS).where(run_artifacts.c.run_id == run_id, run_artifacts.c.name == name)
    with uow:
        uow.runs.get(run_id)
        row = uow.conn.execute(stmt).mappings().first()
    if row is None:
        raise ArtifactNotFound(f"run {run_id} has no artifact named {name!r}")
    return ArtifactView(**row)


@dataclass(frozen=True, slots=True)
class ArtifactFile:
    """A recorded artifact checked on this server's disk, ready to be sent."""

    view: ArtifactView
    path: Path

    @property
    def filename(self) -> str:
        """The name a browser saves it under (the last part of the artifact's name)."""
        return self.view.name.rsplit("/", 1)[-1]


def artifact_file(uow: UnitOfWork, run_id: uuid.UUID, name: str, root: Path) -> ArtifactFile:
    """The artifact `name` of run `run_id`, as the file `root/<run id>/<name>`, checked.

    The file is found from the name, not from the recorded path: the API may mount the workers'
    shared folder elsewhere, and a path column edited to point anywhere is never opened."""
    view = recorded(uow, run_id, name)
    folder = root.resolve() / str(run_id)
    where = f"under {folder} (CONVEYOR_ARTIFACTS_ROOT on this server)"
    # resolve() follows every link, so a name or a link that leads out of the run's folder
    # is refused whatever the row or the disk says.
    real = (folder / name).resolve()
    if not real.is_relative_to(folder) or real == folder:
        raise ArtifactUnavailable(f"artifact {name!r} of run {run_id} is not {where}")
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise ArtifactUnavailable(
            f"artifact {name!r} of run {run_id} is not {where}: the workers' artifacts folder "
            "is not shared with this server, or the file was removed"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactUnavailable(f"artifact {name!r} of run {run_id} is not a regular file")
    if info.st_size != view.size_bytes:
        raise ArtifactChanged(
            f"artifact {name!r} of run {run_id} is {info.st_size} bytes on disk, not the "
            f"{view.size_bytes} the run recorded: it was changed after the run"
        )
    return ArtifactFile(view, real)
