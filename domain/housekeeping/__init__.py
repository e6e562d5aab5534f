"""Housekeeping: rollups and retention, run statistics, numbers for monitoring."""
