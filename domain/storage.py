"""Which implementation of each storage seam runs on a database: chosen here, once per engine.

PostgreSQL through psycopg gets the hot paths on the driver directly (domain/runs/store_pg.py,
domain/runs/reads_pg.py, domain/flow/fair_pg.py: prepared statements, no pool checkout per
call); any other database the portable SQLAlchemy ones (domain/runs/store.py,
domain/runs/reads.py, domain/flow/fair.py). Both kinds answer the same contract tests, so
callers never ask which one they hold.
"""

from __future__ import annotations

from sqlalchemy import Engine

from domain.db.driver import shared_connections
from domain.db.engine import uses_psycopg
from domain.flow.fair import SqlTurns, Turns
from domain.flow.fair_pg import PgTurns
from domain.runs.insert_pg import PgIntake
from domain.runs.reads import RunReads, SqlRunReads
from domain.runs.reads_pg import PgReads
from domain.runs.store import RunStore, SqlRunStore
from domain.runs.store_pg import PgRunStore


def run_store(engine: Engine) -> RunStore:
    """The worker's claim and finish for `engine`'s database."""
    if uses_psycopg(engine):
        return PgRunStore(engine)
    return SqlRunStore(engine)


def run_intake(engine: Engine) -> PgIntake | None:
    """The single enqueue's one-statement path for `engine`'s database (None: the general
    path serves every enqueue), on the engine's shared driver connections."""
    if not uses_psycopg(engine):
        return None
    return PgIntake(shared_connections(engine))


def turn_giver(engine: Engine) -> Turns:
    """Fair-share top-ups for `engine`'s database (domain/flow/fair.py): on PostgreSQL one
    round trip per top-up, on the engine's shared driver connections."""
    if uses_psycopg(engine):
        return PgTurns(shared_connections(engine))
    return SqlTurns(engine)


def run_reads(engine: Engine, *, pool_size: int = 5) -> RunReads:
    """The API's busiest reads for `engine`'s database."""
    if uses_psycopg(engine):
        return PgReads(engine.url.render_as_string(hide_password=False), pool_size=pool_size)
    return SqlRunReads(engine)
