"""`conveyor dev`: conveyor on its embedded default, with no external service."""

from __future__ import annotations

from sqlalchemy import func, select

from conveyor.cli.output import console
from domain.db import create_db_engine
from domain.migrate import ensure_schema
from domain.models import runs
from domain.settings import Settings, redact_url


def run_dev(settings: Settings) -> None:
    """Prepare the local database and report what it holds."""
    url = settings.effective_database_url
    ensure_schema(url)
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            counts: dict[str, int] = dict(
                conn.execute(select(runs.c.status, func.count()).group_by(runs.c.status)).all()
            )
    finally:
        engine.dispose()
    console.print(f"conveyor dev: database {redact_url(url)} is ready (schema at head)")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs yet"
    console.print(f"runs: {summary}")
