"""Admin routes: the audit log, API tokens and webhook endpoints; and the workers list."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Admin, Reader, client_ip
from api.state import State
from domain.runs import reads as queries
from domain.security import audit
from domain.security import tokens as auth
from domain.webhooks import inbound as webhooks

router = APIRouter(prefix="/api/v1", tags=["admin"])


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actor: str | None = Field(None, max_length=200)
    action: str | None = Field(None, max_length=100)
    target_type: str | None = Field(None, max_length=50)
    target_id: str | None = Field(None, max_length=200)
    limit: int = Field(100, ge=1, le=500)
    cursor: str | None = Field(None, max_length=20)


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    role: Literal["readonly", "write", "admin"]


class NewWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    target: str = Field(min_length=1, max_length=200)
    kind: Literal["task", "pipeline"] = "task"
    project: str | None = Field(None, min_length=1, max_length=100)
    allow_unknown: bool = Field(
        False, description="Accept a target no worker has published yet (checked when it runs)"
    )


@router.get("/audit")
def list_audit(state: State, _: Admin, query: Annotated[AuditQuery, Query()]) -> dict[str, Any]:
    """Who changed what, newest first; `next_cursor` pages on."""
    page = audit.list_entries(state.reader(), **query.model_dump())
    return {"items": [entry.to_dict() for entry in page.items], "next_cursor": page.next_cursor}


@router.get("/workers", tags=["workers"])
def list_workers(state: State, _: Reader) -> dict[str, Any]:
    """Worker processes with their queues, load and last heartbeat."""
    return {"items": [w.to_dict() for w in queries.list_workers(state.reader())]}


@router.get("/tokens")
def list_tokens(state: State, _: Admin) -> dict[str, Any]:
    return {"items": [t.to_dict() for t in auth.list_tokens(state.reader())]}


@router.post("/tokens", status_code=201)
def create_token(state: State, who: Admin, request: Request, body: NewToken) -> dict[str, Any]:
    """The token is in this response only; conveyor keeps just its hash."""
    view, token = auth.create_token(
        state.uow(), body.name, body.role, actor=who.name, ip=client_ip(request)
    )
    return {**view.to_dict(), "token": token}


@router.delete("/tokens/{name}")
def revoke_token(state: State, who: Admin, request: Request, name: str) -> dict[str, Any]:
    revoked = auth.revoke_token(state.uow(), name, actor=who.name, ip=client_ip(request))
    request.app.state.tokens.clear()  # at once in this process, not after token_cache_s
    return revoked.to_dict()


@router.get("/webhooks")
def list_webhooks(state: State, _: Admin) -> dict[str, Any]:
    return {"items": [w.to_dict() for w in webhooks.list_webhooks(state.reader())]}


@router.post("/webhooks", status_code=201)
def add_webhook(state: State, who: Admin, request: Request, body: NewWebhook) -> dict[str, Any]:
    """The signing secret is in this response only; it is stored encrypted."""
    view, secret = webhooks.add_webhook(
        state.uow(),
        body.name,
        target=body.target,
        kind=body.kind,
        project=body.project or state.settings.default_project,
        secret_key=state.secret_key,
        actor=who.name,
        ip=client_ip(request),
        catalog=None if body.allow_unknown else state.catalog,
    )
    return {**view.to_dict(), "secret": secret}


@router.delete("/webhooks/{name}", status_code=204)
def remove_webhook(state: State, who: Admin, request: Request, name: str) -> Response:
    webhooks.remove_webhook(state.uow(), name, actor=who.name, ip=client_ip(request))
    return Response(status_code=204)
