"""The whole schema in one place: import this (not a single models module) to get every table."""

from domain import models, models_platform  # noqa: F401 - importing registers the tables
from domain.models import Base

metadata = Base.metadata
