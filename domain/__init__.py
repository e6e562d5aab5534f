"""conveyor's core: models, settings, persistence and services, free of any framework."""

from domain import logging as _logging  # noqa: F401 - conveyor's events stay silent in a library
