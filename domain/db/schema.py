"""The whole schema in one place: import this (not a single models module) to get every table,
and `compared_by_autogenerate` for what the models cannot declare."""

from domain.db.models import Base
from domain.db.partitions import is_partition

metadata = Base.metadata

#: Indexes made by migrations only where an extension provides their operator class (0021's
#: trigram index needs pg_trgm): the models cannot declare them, so autogenerate skips them.
EXTENSION_INDEXES = frozenset({"ix_runs_error_trgm"})


def compared_by_autogenerate(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's `include_name`: autogenerate compares the models' tables and indexes; the day
    partitions (storage of two of them) and the extension indexes are not the models'."""
    if name is None:
        return True
    if type_ == "table":
        return not is_partition(name)
    return not (type_ == "index" and name in EXTENSION_INDEXES)
