"""Seed 003 (an LLM job runner): budgeted jobs with planned steps and a cost ledger."""
