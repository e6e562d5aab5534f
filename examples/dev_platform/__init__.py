"""Seed 002 (an AI development platform): per-project monthly limits, agents as workers."""
