"""Alembic migrations for conveyor's schema (PostgreSQL and SQLite)."""
