"""Seed 001 (a pipeline runner): directory pipelines started by signed webhooks and schedules."""
