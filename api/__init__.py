"""FastAPI status API, webhooks, auth and metrics."""
