"""conveyor's core: its rules and its persistence, free of any framework (no Celery, Redis,
APScheduler, FastAPI or Typer here; ruff's import bans hold that).

One package per concept: db/ (engine, unit of work, tables, column types, migrations, and the
statements that differ between databases), runs/, tasks/, schedules/, webhooks/, callbacks/,
costs/, pipelines/, security/, housekeeping/; storage.py picks each storage seam's
implementation for a database.

What a function takes says what it is:
- a use case (what an API route, a CLI command or the Client calls: create or cancel a run,
  add a schedule, issue a token...) takes a UnitOfWork and plain values and returns views; a
  change made for an `actor` writes its audit row in its own transaction;
- a building block that works inside someone else's transaction takes a Connection;
- a process step that opens its own transactions as it goes (the relay, the reaper, firing
  schedules, delivering callbacks, rollups, the worker's claim and finish) takes an Engine.
"""

from domain import logging as _logging  # noqa: F401 - conveyor's events stay silent in a library
