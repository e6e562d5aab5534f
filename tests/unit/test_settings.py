"""Settings: DSN normalisation, defaults and configuration errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.errors import ConfigurationError
from domain.settings import load_settings, normalize_database_url, redact_url


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgres://u:p@db:5432/app", "postgresql+psycopg://u:p@db:5432/app"),
        ("postgresql://u@db/app", "postgresql+psycopg://u@db/app"),
        ("postgresql+psycopg2://u@db/app", "postgresql+psycopg://u@db/app"),
        ("sqlite:///tmp/x.db", "sqlite:///tmp/x.db"),
    ],
)
def test_database_url_is_normalised_to_psycopg3(raw: str, expected: str) -> None:
    assert normalize_database_url(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("not a url", "is not a database URL"),
        ("postgresql://u:pw@host:notaport/db", "is not a database URL"),
        ("mysql://u@h/d", "supports postgresql and sqlite"),
    ],
)
def test_bad_database_url_names_the_variable(raw: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(database_url=raw)
    assert "CONVEYOR_DATABASE_URL" in str(info.value)
    assert fragment in str(info.value)
    assert info.value.exit_code == 2


def test_password_never_appears_in_url_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(database_url="pgsql://admin:hunter2@host:bad/db")
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in redact_url("postgresql://admin:hunter2@host/db")
    assert "***" in redact_url("postgresql://admin:hunter2@host/db")
    in_query = redact_url("postgresql+psycopg://admin@host/db?password=hunter2&sslmode=require")
    assert "hunter2" not in in_query
    assert "sslmode=require" in in_query


def test_default_database_is_sqlite_under_home(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path)
    assert settings.effective_database_url == f"sqlite:///{tmp_path}/conveyor.db"
    assert settings.is_sqlite


def test_environment_and_dotenv_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("CONVEYOR_LEASE_S=12\nCONVEYOR_DEFAULT_QUEUE=fromfile\n")
    monkeypatch.setenv("CONVEYOR_DEFAULT_QUEUE", "fromenv")
    settings = load_settings()
    assert settings.lease_s == 12
    assert settings.default_queue == "fromenv"  # the environment wins over .env


def test_invalid_number_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_LEASE_S", "soon")
    with pytest.raises(ConfigurationError, match="CONVEYOR_LEASE_S"):
        load_settings()
