"""The composition root: how a process that creates and reads runs is put together.

The API (api/state.py), the Client and the CLI (conveyor/client.py, conveyor/cli/) and dev
mode (conveyor/dev.py) take their engine, publisher, catalog, run reads and delivery checks
from here, so each is wired the same way wherever it runs. Which storage implementation a
database gets is domain/storage.py's decision; this module only asks it.
"""

from __future__ import annotations

from sqlalchemy import Engine

from domain.db.engine import create_db_engine
from domain.ports import Catalog, Publisher
from domain.runs.delivery_checks import DeliveryCheck
from domain.runs.reads import RunReads
from domain.settings import Settings
from domain.storage import run_reads
from domain.tasks.catalog import permissive, producer_catalog


def engine_for(settings: Settings, *, pool_size: int | None = None) -> Engine:
    """The engine on CONVEYOR_DATABASE_URL (or dev mode's SQLite file)."""
    if pool_size is None:
        return create_db_engine(settings.effective_database_url)
    return create_db_engine(settings.effective_database_url, pool_size=pool_size)


def publisher_for(settings: Settings) -> Publisher | None:
    """Publish straight to a real broker; with the in-process broker of dev mode (which another
    process cannot reach) leave delivery to the relay (None)."""
    if settings.broker_url.startswith("memory"):
        return None
    from worker.app import create_app  # Celery is imported only by processes that publish
    from worker.publisher import CeleryPublisher

    return CeleryPublisher(create_app(settings))


def catalog_for(settings: Settings, engine: Engine, *, allow_unknown: bool = False) -> Catalog:
    """How names and params are checked: the tasks this process imports, else what the workers
    published, else pipelines (domain/tasks/catalog.py). With `allow_unknown`, a name nobody
    knows is accepted and checked when a worker claims the run."""
    catalog = producer_catalog(settings, engine)
    return permissive(catalog) if allow_unknown else catalog


def reads_for(engine: Engine) -> RunReads:
    """The runs page, run detail and webhook lookup for `engine`'s database."""
    return run_reads(engine)


def delivery_checks_for(engine: Engine) -> DeliveryCheck:
    """Why a new run may wait: no live worker on its queue, or none that has its task."""
    return DeliveryCheck(engine)
