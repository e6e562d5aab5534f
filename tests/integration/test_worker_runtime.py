"""A worker process's runtime that fails to start (here: a secret key that cannot open the stored
secrets) stops what it had started: no thread of conveyor's is left running."""

from __future__ import annotations

import threading

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine

from domain.secrets import SecretKeyError, SecretStore
from domain.settings import load_settings
from worker.runtime import WorkerRuntime


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
