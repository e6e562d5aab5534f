"""A worker process's runtime: one per app's settings in a process (never another app's
database), and one that fails to start (here: a secret key that cannot open the stored secrets)
stops what it had started: no thread of conveyor's is left running."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine

from domain.security.secrets import SecretKeyError, SecretStore
from domain.settings import load_settings
from worker.runtime import WorkerRuntime, close_runtime, get_runtime


def conveyor_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("conveyor-")}


def test_a_failed_start_leaves_no_thread_behind(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    SecretStore(engine, Fernet.generate_key().decode()).set("API_TOKEN", "s3cr3t-value")
    engine.dispose()
    settings = load_settings(
        database_url=sqlite_url,
        broker_url="memory://",
        secret_key=Fernet.generate_key().decode(),  # not the key the secret was stored with
    )
    before = conveyor_threads()
    with pytest.raises(SecretKeyError):
        WorkerRuntime(settings)
    assert conveyor_threads() == before


def test_each_apps_settings_get_their_own_runtime(tmp_path: Path, sqlite_template: Path) -> None:
    urls = []
    for name in ("a.db", "b.db"):
        shutil.copy(sqlite_template, tmp_path / name)
        urls.append(f"sqlite:///{tmp_path / name}")
    first, second = (load_settings(database_url=u, broker_url="memory://") for u in urls)
    before = conveyor_threads()
    try:
        assert get_runtime(first) is get_runtime(first)
        assert str(get_runtime(first).engine.url) == urls[0]
        # A second app in the same process (a test, an embedding program) writes its own runs.
        assert str(get_runtime(second).engine.url) == urls[1]
    finally:
        close_runtime()
    assert conveyor_threads() <= before
