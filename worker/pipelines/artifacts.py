"""A pipeline run's artifacts: the files it left in $CONVEYOR_ARTIFACTS_DIR, with size and
sha256, renamed first when a name shows a secret."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from domain.pipelines.store import ArtifactRecord
from domain.security.masking import MASK, NO_SECRETS, Masker


def collect_artifacts(folder: Path, masker: Masker = NO_SECRETS) -> list[ArtifactRecord]:
    """Regular files under `folder` (symlinks are not followed: a link could point anywhere).

    A file whose name shows a secret is renamed to its masked name first: the name stored and
    served is then the file's real name, and the secret is gone from the folder's listing too.
    """
    items = []
    for found in _regular_files(folder):
        path, name = found, found.relative_to(folder).as_posix()
        if masker and (masked := masker(name)) != name:
            path = _rename_masked(folder, found, masked)
            name = path.relative_to(folder).as_posix()
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as handle:
            while chunk := handle.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
        items.append(ArtifactRecord(name[:500], str(path), size, digest.hexdigest()))
    return items


def _regular_files(folder: Path) -> list[Path]:
    """Listed in full before any is renamed, so a rename cannot show up in the walk."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            if not path.is_symlink() and path.is_file():
                found.append(path)
    return found


def _rename_masked(folder: Path, path: Path, masked: str) -> Path:
    """Move `path` to `folder/masked`, never over another file, pruning emptied directories."""
    # A mask spanning a "/" must not make a name climb out of the folder.
    parts = [p for p in masked.split("/") if p not in {"", ".", ".."}] or [MASK]
    target = folder.joinpath(*parts)
    stem, suffix, n = target.stem, target.suffix, 1
    while target.exists() or target.is_symlink():
        n += 1
        target = target.with_name(f"{stem}-{n}{suffix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    path.rename(target)
    parent = path.parent
    with contextlib.suppress(OSError):
        while parent != folder and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    return target
