"""Directory pipelines: discovery under CONVEYOR_PIPELINES_DIR, and the catalog that turns a
pipeline name into run defaults.

Every folder with a `main.py` is a pipeline named after the folder (a `main.ipynb`, run cell by
cell, when pipeline.json says `"type": "notebook"`); `requirements.txt` (or
`requirements.txt.lock`, which wins) and `pipeline.json` (or Fast-Flow's `<name>.json`) are
optional. A folder whose pipeline.json is invalid is still listed, disabled, with the exact
error; the others keep working. `encrypted_env` is decrypted here, with the directory's
secret key, so a value that does not open disables its pipeline at once (see
domain/pipelines/encrypted_env.py). Lookups go through the discovered list only, never by
joining a requested name onto a path, so no name can reach outside the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from domain.db.models import runs
from domain.errors import Conflict, InvalidInput, UnknownTask
from domain.pipelines.config import ParsedConfig, PipelineConfig, parse_config
from domain.pipelines.encrypted_env import NOTHING, EncryptedEnvError, OpenedEnv, open_env
from domain.pipelines.env import run_env_overrides
from domain.pipelines.retry import StrategyRetryPolicy
from domain.ports import Catalog, TargetDefaults
from domain.runs.requests import NAME_PATTERN
from domain.runs.states import ACTIVE
from domain.security.crypto import secret_key_from

ENTRYPOINT = "main.py"
NOTEBOOK = "main.ipynb"
CONFIG_FILE = "pipeline.json"
REQUIREMENTS = "requirements.txt"
LOCKFILE = "requirements.txt.lock"
_DEPS = (REQUIREMENTS, LOCKFILE)
_SKIPPED_DIRS = {"__pycache__", "node_modules"}


class PipelineDisabled(InvalidInput):
    """This pipeline is disabled."""


@dataclass(frozen=True)
class PipelineSettings:
    """What pipelines need from the environment, read by `pipeline_settings()`."""

    pipelines_dir: Path
    cache_dir: Path
    artifacts_root: Path
    setup_timeout_s: float = 600.0
    legacy_webhooks: bool = False


def pipeline_settings(settings: Any, environ: Mapping[str, str] | None = None) -> PipelineSettings:
    """From Settings fields when they exist (pipelines_dir, pipeline_cache_dir, artifacts_root,
    pipeline_setup_timeout_s, pipeline_legacy_webhooks), else from CONVEYOR_* variables."""
    env = os.environ if environ is None else environ
    home = Path(getattr(settings, "home", None) or env.get("CONVEYOR_HOME", ".conveyor"))

    def pick(attr: str, var: str, default: Any) -> Any:
        value = getattr(settings, attr, None)
        return value if value not in (None, "") else env.get(var) or default

    return PipelineSettings(
        pipelines_dir=Path(pick("pipelines_dir", "CONVEYOR_PIPELINES_DIR", "pipelines")),
        cache_dir=Path(pick("pipeline_cache_dir", "CONVEYOR_PIPELINE_CACHE_DIR", home / "envs")),
        artifacts_root=Path(pick("artifacts_root", "CONVEYOR_ARTIFACTS_ROOT", home / "artifacts")),
        setup_timeout_s=float(
            pick("pipeline_setup_timeout_s", "CONVEYOR_PIPELINE_SETUP_TIMEOUT_S", 600)
        ),
        legacy_webhooks=str(
            pick("pipeline_legacy_webhooks", "CONVEYOR_PIPELINE_LEGACY_WEBHOOKS", "false")
        ).lower()
        in {"1", "true", "yes", "on"},
    )


@dataclass(frozen=True)
class DiscoveredPipeline:
    """One folder: its parsed config, or why it cannot run."""

    name: str
    path: Path
    config: PipelineConfig | None
    error: str | None = None
    warnings: tuple[str, ...] = ()
    requirements: Path | None = None
    requirements_hash: str | None = None
    config_file: Path | None = field(default=None, compare=False)
    #: encrypted_env, decrypted (its repr shows names only)
    opened_env: OpenedEnv = field(default=NOTHING, compare=False, repr=False)

    @property
    def runnable(self) -> bool:
        """Valid and enabled: it can be enqueued and run."""
        return self.error is None and self.config is not None and self.config.enabled

    @property
    def status(self) -> str:
        if self.error is not None:
            return "invalid"
        return "enabled" if self.runnable else "disabled"

    @property
    def is_notebook(self) -> bool:
        return self.config is not None and self.config.type == "notebook"

    @property
    def entrypoint(self) -> Path:
        """main.py, or main.ipynb for a notebook pipeline."""
        return self.path / (NOTEBOOK if self.is_notebook else ENTRYPOINT)

    def require_runnable(self) -> PipelineConfig:
        """The config of a runnable pipeline; PipelineDisabled naming why otherwise."""
        if self.error is not None:
            raise PipelineDisabled(f"pipeline {self.name!r} is disabled: {self.error}")
        if self.config is None or not self.config.enabled:
            raise PipelineDisabled(
                f'pipeline {self.name!r} is disabled: "enabled": false in its pipeline.json'
            )
        return self.config

    @property
    def defaults(self) -> TargetDefaults:
        config = self.require_runnable()
        return TargetDefaults(
            kind="pipeline",
            queue=config.queue,
            priority=config.priority,
            max_attempts=config.max_attempts,
            timeout_s=config.timeout_s,
        )

    @property
    def retry_policy(self) -> StrategyRetryPolicy:
        return self.require_runnable().retry_policy


def discover(root: Path, *, secret_key: str = "") -> list[DiscoveredPipeline]:
    """Every pipeline folder under `root`, sorted by name (a missing root has none);
    `secret_key` (CONVEYOR_SECRET_KEY) opens their encrypted_env."""
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.name in _SKIPPED_DIRS or not entry.is_dir():
            continue
        pipeline = inspect_folder(root, entry, secret_key=secret_key)
        if pipeline is not None:
            found.append(pipeline)
    return found


def inspect_folder(root: Path, folder: Path, *, secret_key: str = "") -> DiscoveredPipeline | None:
    """The pipeline in `folder`, or None when the folder does not look like one at all."""
    name = folder.name
    label = f"{root.name}/{name}"
    config_file = _config_file(folder)
    requirements = _requirements(folder)
    script, notebook = (folder / ENTRYPOINT).is_file(), (folder / NOTEBOOK).exists()
    if not script and not notebook and config_file is None and requirements is None:
        return None  # a data or helper folder, not an attempt at a pipeline
    if not re.match(NAME_PATTERN, name) or len(name) > 200:
        return DiscoveredPipeline(
            name,
            folder,
            None,
            f"{label}: the folder name is not a valid pipeline name (letters, digits, _ . : -)",
        )
    parsed = _parse(config_file, label)
    missing = _missing_entrypoint(folder, parsed.config, label, config_file)
    if missing is not None:
        return DiscoveredPipeline(
            name, folder, None, missing, parsed.warnings, config_file=config_file
        )
    opened = NOTHING
    if parsed.config is not None and parsed.config.encrypted_env:
        source = f"{label}/{config_file.name if config_file else CONFIG_FILE}"
        try:
            opened = open_env(parsed.config.encrypted_env, secret_key, source=source)
        except EncryptedEnvError as exc:
            parsed = ParsedConfig(None, str(exc), parsed.warnings)
    req_hash = None
    if requirements is not None:
        text = requirements.read_bytes()
        if _has_requirements(text):
            req_hash = hashlib.sha256(text).hexdigest()
        else:
            requirements = None  # only comments: nothing to install
    return DiscoveredPipeline(
        name,
        folder,
        parsed.config,
        parsed.error,
        parsed.warnings,
        requirements,
        req_hash,
        config_file,
        opened,
    )


def _missing_entrypoint(
    folder: Path, config: PipelineConfig | None, label: str, config_file: Path | None
) -> str | None:
    """Why the file the pipeline runs is not there (or is not a notebook); None when it is."""
    if config is not None and config.type == "notebook":
        named = config_file.name if config_file else CONFIG_FILE
        path = folder / NOTEBOOK
        if not path.is_file():
            return f'{label}: no {NOTEBOOK} in the folder ("type": "notebook" in {named})'
        return _not_a_notebook(path, label)
    if (folder / ENTRYPOINT).is_file():
        return None
    if config is None and config_file is not None:
        return None  # the config's own error says more
    hint = ' (to run main.ipynb, set "type": "notebook" in pipeline.json)'
    return f"{label}: no {ENTRYPOINT} in the folder{hint if (folder / NOTEBOOK).exists() else ''}"


def _not_a_notebook(path: Path, label: str) -> str | None:
    """A cheap look at main.ipynb: a JSON object with a list of cells (nbformat 4)."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        return f"{label}/{NOTEBOOK}: cannot be read ({exc.strerror})"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return f"{label}/{NOTEBOOK}: not a notebook (invalid JSON: {exc})"
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        return f'{label}/{NOTEBOOK}: not a notebook (no "cells" list; nbformat 4 is expected)'
    if data.get("nbformat", 4) < 4:
        return f"{label}/{NOTEBOOK}: nbformat {data['nbformat']} is too old (4 is expected)"
    return None


def _config_file(folder: Path) -> Path | None:
    for candidate in (folder / CONFIG_FILE, folder / f"{folder.name}.json"):
        if candidate.is_file():
            return candidate
    return None


def _requirements(folder: Path) -> Path | None:
    for candidate in (folder / LOCKFILE, folder / REQUIREMENTS):
        if candidate.is_file():
            return candidate
    return None


def _parse(config_file: Path | None, label: str) -> ParsedConfig:
    if config_file is None:
        return parse_config(None, source=f"{label}/{CONFIG_FILE}")
    source = f"{label}/{config_file.name}"
    try:
        return parse_config(config_file.read_bytes(), source=source)
    except OSError as exc:
        return ParsedConfig(None, f"{source}: cannot be read ({exc.strerror})")


def _has_requirements(text: bytes) -> bool:
    for line in text.decode("utf-8", "replace").splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped:
            return True
    return False


class PipelineDirectory:
    """The pipelines under one root, re-discovered whenever a relevant file changes.

    Each lookup stats a few files per pipeline (cheap) rather than re-reading every JSON file.
    """

    def __init__(self, root: Path, *, secret_key: str = "") -> None:
        # Absolute once: a pipeline runs with its own folder as working directory, where a
        # relative root (the default ./pipelines) would point somewhere else.
        self.root = Path(root).resolve()
        self._secret_key = secret_key
        self._lock = threading.Lock()
        self._fingerprint: tuple[Any, ...] | None = None
        self._items: dict[str, DiscoveredPipeline] = {}

    def all(self) -> list[DiscoveredPipeline]:
        with self._lock:
            fingerprint = self._scan_fingerprint()
            if fingerprint != self._fingerprint:
                found = discover(self.root, secret_key=self._secret_key)
                self._items = {p.name: p for p in found}
                self._fingerprint = fingerprint
            return list(self._items.values())

    def find(self, name: str) -> DiscoveredPipeline | None:
        return next((p for p in self.all() if p.name == name), None)

    def get(self, name: str) -> DiscoveredPipeline:
        """The pipeline named `name`; UnknownTask when there is none (so other catalogs may
        answer). A disabled one is returned too: callers decide (`require_runnable`)."""
        pipeline = self.find(name)
        if pipeline is None:
            raise UnknownTask(
                f"no task or pipeline named {name!r} (pipelines in {self.root}: "
                f"{', '.join(p.name for p in self.all()) or 'none'})",
                name=name,
            )
        return pipeline

    def _scan_fingerprint(self) -> tuple[Any, ...]:
        parts: list[Any] = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            return ("missing",)
        for entry in entries:
            if not entry.is_dir():
                continue
            parts.append((entry.name, _mtime(entry.path)))
            for fname in (ENTRYPOINT, NOTEBOOK, CONFIG_FILE, f"{entry.name}.json", *_DEPS):
                parts.append(_mtime(os.path.join(entry.path, fname)))
        return tuple(parts)


def _mtime(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class PipelineCatalog(Catalog):
    """Resolves pipeline names: defaults from pipeline.json, params kept as the JSON object
    they are. With an engine it also enforces `max_instances` at enqueue time."""

    def __init__(self, directory: PipelineDirectory, engine: Engine | None = None) -> None:
        self.directory = directory
        self.engine = engine

    def resolve(self, name: str, params: dict[str, Any]) -> tuple[TargetDefaults, dict[str, Any]]:
        pipeline = self.directory.get(name)
        defaults = pipeline.defaults  # PipelineDisabled when it cannot run
        if not isinstance(params, dict):
            raise InvalidInput("params: must be a JSON object", field="params")
        run_env_overrides(params)  # a bad `_env` is refused now, not when the run starts
        config = pipeline.require_runnable()
        if config.max_instances is not None and self.engine is not None:
            active = count_active_runs(self.engine, name)
            if active >= config.max_instances:
                raise Conflict(
                    f"pipeline {name!r} already has {active} pending or running runs "
                    f"(max_instances is {config.max_instances} in its pipeline.json)",
                    name=name,
                )
        return defaults, params

    def names(self) -> list[str]:
        return sorted(p.name for p in self.directory.all())


def count_active_runs(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(runs)
                .where(runs.c.name == name, runs.c.kind == "pipeline", runs.c.status.in_(ACTIVE))
            ).scalar_one()
        )


def pipeline_directory_for(settings: Any) -> PipelineDirectory:
    """The configured pipelines directory, opening encrypted_env with the configured key: what
    every process uses, so all of them agree on which pipelines can run."""
    return PipelineDirectory(
        pipeline_settings(settings).pipelines_dir, secret_key=secret_key_from(settings)
    )


def pipeline_catalog_for(settings: Any, engine: Engine | None = None) -> PipelineCatalog:
    """The catalog of the configured pipelines directory (an empty one if it does not exist)."""
    return PipelineCatalog(pipeline_directory_for(settings), engine)
