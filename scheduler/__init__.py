"""Scheduler process: leader lock, relay, reaper (and schedules, retention, rollups)."""
