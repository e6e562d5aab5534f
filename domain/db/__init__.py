"""The database: engines, the unit of work, tables, column types and migrations."""
