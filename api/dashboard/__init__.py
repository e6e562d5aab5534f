"""The dashboard `conveyor api` serves at /: server-rendered pages (overview, runs, a run,
schedules, pipelines, projects, limits, the audit log),
with the API's tokens and roles, and every asset served from this package (no CDN)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from api import errors
from api.dashboard import bulk, ops_pages, pages, routes


def install(app: FastAPI) -> None:
    app.mount(pages.ASSETS, StaticFiles(directory=pages.STATIC), name="dashboard-assets")
    app.include_router(bulk.router)  # before /runs/{run_id}, which would take /runs/bulk
    app.include_router(routes.router)
    app.include_router(ops_pages.router)
    app.add_exception_handler(HTTPException, _not_found_page)


async def _not_found_page(request: Request, exc: Exception) -> Response:
    """No such page (or method) as a page for a browser; the API's JSON for everyone else."""
    if isinstance(exc, HTTPException) and pages.wants_page(request):
        return await pages.failure_page(request, exc)
    return await errors.answer(request, exc)
