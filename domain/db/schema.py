"""The whole schema in one place: import this (not a single models module) to get every table."""

from domain.db.models import Base

metadata = Base.metadata
