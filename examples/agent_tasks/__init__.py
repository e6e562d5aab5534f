"""Seed 000 (an agent orchestrator): prioritised agent tasks on conveyor."""
