"""A file sent as a download: an attachment of opaque bytes that no browser renders, so an
artifact holding HTML or script cannot run in the API's or the dashboard's origin."""

from __future__ import annotations

from fastapi.responses import FileResponse

from domain.runs.artifacts import ArtifactFile

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, no-cache",
}


def attachment(found: ArtifactFile) -> FileResponse:
    """`found` as `Content-Disposition: attachment`, with its recorded sha256 as the ETag."""
    headers = {**HEADERS, "ETag": f'"{found.view.sha256}"'}
    return FileResponse(
        found.path,
        media_type="application/octet-stream",
        filename=found.filename,
        content_disposition_type="attachment",
        headers=headers,
    )
