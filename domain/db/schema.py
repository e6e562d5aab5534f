"""The whole schema in one place: import this (not a single models module) to get every table,
and what autogenerate compares (`compared_by_autogenerate`, `compared_objects`) for what the
models cannot declare."""

from collections.abc import Callable

from sqlalchemy import Connection, ForeignKeyConstraint

import domain.db.models_platform  # noqa: F401 - its tables are part of the schema
from domain.db.capabilities import capabilities
from domain.db.models import Base
from domain.db.partitions import is_partition

metadata = Base.metadata

#: Indexes made by migrations only where an extension provides their operator class (0021's
#: trigram index needs pg_trgm): the models cannot declare them, so autogenerate skips them.
EXTENSION_INDEXES = frozenset({"ix_runs_error_trgm"})

#: The keys to runs that migration 0022 replaced with triggers where the keys are triggers
#: (`capabilities(...).run_key_triggers`): the models keep them (SQLite has them, and they say
#: what the triggers do), the database does not.
RUN_KEYS_AS_TRIGGERS = frozenset(
    {
        "fk_cost_entries_run_id_runs",
        "fk_cost_reservations_run_id_runs",
        "fk_outbound_deliveries_run_id_runs",
        "fk_run_artifacts_run_id_runs",
        "fk_run_metrics_run_id_runs",
        "fk_run_signals_run_id_runs",
        "fk_run_steps_run_id_runs",
        "fk_runs_parent_run_id_runs",
        "fk_schedule_fires_run_id_runs",
        "fk_webhook_deliveries_run_id_runs",
    }
)

ObjectFilter = Callable[[object, str | None, str, bool, object], bool]


def compared_by_autogenerate(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's `include_name`: autogenerate compares the models' tables and indexes; the day
    partitions (storage of two of them) and the extension indexes are not the models'."""
    if name is None:
        return True
    if type_ == "table":
        return not is_partition(name)
    return not (type_ == "index" and name in EXTENSION_INDEXES)


def compared_objects(conn: Connection) -> ObjectFilter:
    """Alembic's `include_object` for the database behind `conn`: where the keys to runs are
    triggers, the models' keys to runs are not looked for."""
    skipped = RUN_KEYS_AS_TRIGGERS if capabilities(conn).run_key_triggers else frozenset()

    def compared(
        obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
    ) -> bool:
        return not (
            type_ == "foreign_key_constraint"
            and isinstance(obj, ForeignKeyConstraint)
            and name in skipped
        )

    return compared
