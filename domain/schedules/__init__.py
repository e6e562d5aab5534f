"""Schedules: definitions, firing each slot exactly once, and the leader's heartbeat."""
