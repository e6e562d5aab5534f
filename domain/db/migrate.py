"""Run Alembic from code: `conveyor migrate`, dev mode and tests all go through here."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

import migrations
from domain.db.engine import create_db_engine, describe_db_error, wait_for_database
from domain.errors import DatabaseUnavailable, InvalidInput, SchemaNotReady
from domain.settings import redact_url

log = structlog.get_logger("conveyor.db")

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, *, revision: str = "head", wait_s: float = 30.0) -> None:
    """Wait for the database (clear error if it stays down), then upgrade to `revision`; a
    revision that does not exist is an InvalidInput before the database is touched."""
    if not revision.startswith(("+", "-")):  # relative steps resolve against the database
        script = ScriptDirectory.from_config(alembic_config(url))
        try:
            script.get_revisions(revision)
        except CommandError as exc:
            raise InvalidInput(
                f"revision: {exc}; expected head or a revision id (the latest is "
                f"{script.get_current_head()})",
                field="revision",
            ) from None
    engine = create_db_engine(url, null_pool=True)
    try:
        wait_for_database(engine, timeout_s=wait_s)
    finally:
        engine.dispose()
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, *, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def ensure_schema(url: str) -> None:
    """Upgrade to head only when behind (cheap on every start of dev mode)."""
    engine = create_db_engine(url, null_pool=True)
    try:
        behind = current_revision(engine) != head_revision(url)
    finally:
        engine.dispose()
    if behind:
        upgrade(url)


def schema_problem(engine: Engine, url: str) -> str | None:
    """What keeps this code from using the database's schema, with the fix; None when it is at
    this code's head, or at a revision this code does not know (a newer one: migrations only
    add, so older code keeps working while a deployment rolls forward)."""
    current = current_revision(engine)
    head = head_revision(url)
    if current == head:
        return None
    where = redact_url(url)
    if current is None:
        return f"the database {where} has no conveyor schema yet: run `conveyor migrate`"
    try:
        ScriptDirectory.from_config(alembic_config(url)).get_revision(current)
    except CommandError:
        return None
    return (
        f"the database {where} is at schema revision {current} and this code needs {head}: "
        "run `conveyor migrate`"
    )


def require_schema(url: str) -> None:
    """SchemaNotReady (or DatabaseUnavailable) unless the schema is usable: one check."""
    engine = create_db_engine(url, null_pool=True)
    try:
        try:
            problem = schema_problem(engine, url)
        except DBAPIError as exc:
            raise DatabaseUnavailable(describe_db_error(url, exc)) from None
    finally:
        engine.dispose()
    if problem is not None:
        raise SchemaNotReady(problem)


def wait_for_schema(
    url: str,
    *,
    timeout_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    say_every_s: float = 10.0,
) -> None:
    """Block until the database answers and has this code's schema, for long-running processes
    started beside `conveyor migrate` (api, worker, scheduler): they wait, saying why every
    `say_every_s`, instead of crashing on a missing table. `timeout_s` None: wait for ever."""
    engine = create_db_engine(url, null_pool=True)
    started = monotonic()
    said_at = float("-inf")
    delay = 0.2
    try:
        while True:
            try:
                problem = schema_problem(engine, url)
                down = False
            except DBAPIError as exc:
                problem, down = describe_db_error(url, exc), True
            if problem is None:
                if said_at > float("-inf"):
                    log.info("db.ready", database=redact_url(url))
                return
            if timeout_s is not None and monotonic() - started >= timeout_s:
                raise (DatabaseUnavailable if down else SchemaNotReady)(problem)
            if monotonic() - said_at >= say_every_s:
                event = "db.waiting" if down else "db.waiting_for_schema"
                log.warning(event, reason=problem, retry_in=round(delay, 2))
                said_at = monotonic()
            sleep(delay)
            delay = min(delay * 2, 5.0)
    finally:
        engine.dispose()
