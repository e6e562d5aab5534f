"""Seed 004 (a kanban SDLC orchestrator): a card moving through stages as chained runs."""
