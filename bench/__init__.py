"""Benchmarks: each prints conveyor beside a plain-Celery baseline measured in the same run."""
