"""Settings: one pydantic-settings object read from CONVEYOR_* variables and `.env`."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from domain.errors import ConfigurationError

DEFAULT_HOME = Path(".conveyor")


def normalize_database_url(raw: str) -> str:
    """Return `raw` as a SQLAlchemy URL with conveyor's drivers (psycopg 3 for PostgreSQL).

    Raises ConfigurationError naming CONVEYOR_DATABASE_URL when the value does not parse or names
    a database conveyor does not support.
    """
    value = raw.strip()
    if value.startswith("postgres://"):  # Heroku-style scheme
        value = "postgresql://" + value.removeprefix("postgres://")
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise ConfigurationError(
            f"CONVEYOR_DATABASE_URL {redact_url(value)!r} is not a database URL; expected e.g. "
            "postgresql://user@host:5432/dbname or sqlite:///path/to/file.db",
            field="database_url",
        ) from None
    backend = url.get_backend_name()
    if backend == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    elif backend != "sqlite":
        raise ConfigurationError(
            f"CONVEYOR_DATABASE_URL uses {backend!r}; conveyor supports postgresql and sqlite",
            field="database_url",
        )
    return url.render_as_string(hide_password=False)


def redact_url(value: str | URL) -> str:
    """The URL with its password replaced by ***, safe for logs and error messages."""
    try:
        url = make_url(value) if isinstance(value, str) else value
    except (ArgumentError, ValueError):
        # Not a URL we can parse: hide whatever could be credentials (user:pass@).
        return re.sub(r"//[^/@]*@", "//***@", str(value))
    # libpq also takes a password (or a whole connection string's secrets) as a query value.
    secret = {k: "***" for k in url.query if k.lower() in _SECRET_QUERY_KEYS}
    rendered = url.update_query_dict(secret).render_as_string(hide_password=True)
    return rendered.replace("=%2A%2A%2A", "=***")  # as the password part reads


_SECRET_QUERY_KEYS = {"password", "sslpassword", "passfile", "sslkey"}


class Settings(BaseSettings):
    """Everything conveyor reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    home: Path = Field(DEFAULT_HOME, description="Directory for the SQLite file and local state.")
    database_url: str = Field("", description="SQLAlchemy/PostgreSQL URL; empty = SQLite in home.")
    broker_url: str = Field("memory://", description="Celery broker; redis://... in production.")
    database_connect_timeout_s: float = Field(
        30.0, ge=0, description="How long to wait for the DB."
    )
    default_queue: str = "default"
    submit_queue: str = Field(
        "celery",
        description="Queue workers also consume for conveyor.submit from plain Celery clients "
        "(Celery's own default queue); empty to disable.",
    )
    default_project: str = "default"
    lease_s: float = Field(
        30.0, gt=0, description="How long a claimed run is owned without heartbeat."
    )
    heartbeat_s: float = Field(10.0, gt=0, description="How often a running run extends its lease.")
    dispatch_in_flight: int = Field(
        100,
        ge=0,
        le=100_000,
        description="Per queue, how many published runs may wait unclaimed; past that, new runs "
        "are published in turns between projects, weighted (fair share); 0 turns it off.",
    )
    dispatch_grace_s: float = Field(
        30.0, gt=0, description="How long a published run may stay unclaimed before re-publishing."
    )
    task_modules: str = Field(
        "", description="Comma-separated modules whose @task functions workers and clients load."
    )
    kill_grace_s: float = Field(
        5.0, ge=0, description="After a timeout or cancel, how long a task may wind down."
    )
    broker_visibility_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Redis redelivery timeout for unacked messages (conveyor acks "
        "on receipt, so long runs are never redelivered; the lease recovers lost work).",
    )
    schedule_misfire_grace_s: float = Field(
        60.0, ge=0, description="A slot fired this late still runs; older ones are misfires."
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long running runs may finish before they are "
        "ended and handed back.",
    )
    relay_interval_s: float = Field(0.5, gt=0, description="How often the relay sweeps.")
    reaper_interval_s: float = Field(5.0, gt=0, description="How often expired leases are swept.")
    no_scheduler_after_s: float = Field(
        30.0,
        gt=0,
        description="After this long without a leading scheduler, workers warn each minute "
        "and /readyz reports not ready (retries, delayed runs and recovery wait for one).",
    )
    secret_key: SecretStr = Field(
        SecretStr(""),
        description="Fernet key(s), comma-separated, newest first: encrypts secrets and "
        "webhook signing keys; older keys still decrypt (rotation).",
    )
    webhook_max_bytes: int = Field(1 << 20, gt=0, description="Largest webhook body accepted.")
    webhook_tolerance_s: float = Field(
        300.0, gt=0, description="How far a webhook's signed timestamp may be from now."
    )
    prices_file: Path = Field(
        Path("prices.toml"),
        description="USD per million input/output tokens per provider and model (optional).",
    )
    # Callbacks and notifications out (domain/callbacks/outbound.py, scheduler/deliveries.py).
    # They are signed with the webhook's secret for a run a webhook created, else with a key
    # derived from CONVEYOR_SECRET_KEY (`conveyor notify key` prints it for receivers).
    outbound_deadline_s: float = Field(
        3600.0,
        gt=0,
        description="How long a callback or notification is retried before conveyor gives up.",
    )
    outbound_timeout_s: float = Field(
        5.0, gt=0, le=60, description="Timeout of one callback or notification POST."
    )
    outbound_allow_private: bool = Field(
        False,
        description=(
            "Let callbacks and notifications go to loopback, private, link-local and other "
            "non-public addresses. Off by default: whoever may enqueue chooses a run's "
            "callback_url, and it must not reach a metadata service or an internal admin port."
        ),
    )
    outbound_backoff_s: float = Field(
        2.0, gt=0, description="Delay before the first retry; it doubles with each attempt."
    )
    outbound_backoff_max_s: float = Field(
        300.0, gt=0, description="The longest delay between two attempts."
    )
    trusted_proxies: str = Field(
        "",
        description="Reverse proxies in front of `conveyor api` (addresses or networks, "
        "comma-separated): X-Forwarded-For is believed only from them. Empty: the connecting "
        "address is the client's, whatever headers it sends.",
    )
    retention_days: float = Field(
        30.0, gt=0, description="Finished runs older than this are deleted with their records."
    )
    retention_rules: dict[str, float] = Field(
        default_factory=dict,
        description='Per project/status ages in days, JSON: {"acme": 90, "*:failed": 180}.',
    )
    archive_dir: Path | None = Field(
        None, description="If set, runs are written here (gzip JSON lines) before deletion."
    )
    rollup_interval_s: float = Field(60.0, gt=0, description="How often run_stats is updated.")
    retention_interval_s: float = Field(600.0, gt=0, description="How often retention runs.")
    pipelines_dir: Path = Field(
        Path("pipelines"), description="Each folder with a main.py here is a pipeline."
    )
    pipeline_cache_dir: Path | None = Field(
        None, description="uv environments (default: <home>/envs)."
    )
    artifacts_root: Path | None = Field(
        None, description="Per-run artifact folders (default: <home>/artifacts)."
    )
    pipeline_setup_timeout_s: float = Field(
        600.0, gt=0, description="Longest a uv environment build may take."
    )
    pipeline_legacy_webhooks: bool = Field(
        False, description="Honour pipeline.json webhook_key (the key travels in the URL)."
    )
    log_format: str = Field("auto", pattern="^(auto|json|console)$")
    log_level: str = "INFO"

    @field_validator("database_url")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return normalize_database_url(value) if value else ""

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: str) -> str:
        return ",".join(_proxy(entry.strip()) for entry in value.split(",") if entry.strip())

    @property
    def trusted_proxy_list(self) -> list[str]:
        """CONVEYOR_TRUSTED_PROXIES, each entry an IP address or a network in CIDR form."""
        return [entry for entry in self.trusted_proxies.split(",") if entry]

    @property
    def effective_database_url(self) -> str:
        """The configured database, or the SQLite file under `home` by default."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'conveyor.db').as_posix()}"

    @property
    def task_module_list(self) -> list[str]:
        return [m.strip() for m in self.task_modules.split(",") if m.strip()]

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")


def _proxy(entry: str) -> str:
    """One trusted proxy, written as uvicorn matches it (it would ignore a host or a network
    with host bits set, without a word)."""
    try:
        if "/" in entry:
            return str(ipaddress.ip_network(entry, strict=False))
        return str(ipaddress.ip_address(entry))
    except ValueError:
        raise ConfigurationError(
            f"CONVEYOR_TRUSTED_PROXIES: {entry!r} is not an IP address or network "
            "(expected e.g. 10.0.0.5,10.1.0.0/16)",
            field="trusted_proxies",
        ) from None


def load_settings(**overrides: object) -> Settings:
    """Build Settings, turning validation failures into one clear ConfigurationError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ConfigurationError:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, ConfigurationError):
            raise cause from None
        raise ConfigurationError(f"CONVEYOR_{field.upper()}: {err['msg']}", field=field) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide Settings, read once."""
    return load_settings()
