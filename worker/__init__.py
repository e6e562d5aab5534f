"""Celery worker: the app factory, the run executor, the task SDK and the log writer."""
