"""The dashboard `conveyor api` serves at /: server-rendered pages (overview, runs, a run,
schedules, pipelines, projects, limits, the audit log),
with the API's tokens and roles, and every asset served from this package (no CDN)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.dashboard import bulk, ops_pages, pages, routes


def install(app: FastAPI) -> None:
    app.mount(pages.ASSETS, StaticFiles(directory=pages.STATIC), name="dashboard-assets")
    app.include_router(bulk.router)  # before /runs/{run_id}, which would take /runs/bulk
    app.include_router(routes.router)
    app.include_router(ops_pages.router)
