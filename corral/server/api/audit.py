"""The audit log: read it, and verify its hash chain."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import select

from corral.server import audit
from corral.server.api.deps import Admin, Ctx, Paging, Viewer, encode_cursor
from corral.server.api.views import iso
from corral.server.store.models import AuditEntry

router = APIRouter(tags=["audit"])


class AuditOut(BaseModel):
    seq: int
    ts: str | None
    actor: str
    action: str
    target: str
    detail: dict[str, Any]
    request_id: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_cursor: str | None = None


class VerifyOut(BaseModel):
    ok: bool
    entries: int
    problem: str
    seq: int | None


@router.get("/audit", response_model=AuditPage, summary="Audit log entries, newest first")
async def list_audit(ctx: Ctx, _: Viewer, paging: Paging,
                     action: Annotated[str | None, Query(description="prefix, e.g. device.")] = None,
                     actor: Annotated[str | None, Query()] = None,
                     target: Annotated[str | None, Query()] = None) -> AuditPage:
    stmt = select(AuditEntry).order_by(AuditEntry.seq.desc())
    if paging.cursor:
        stmt = stmt.where(AuditEntry.seq < int(paging.cursor[0]))
    if action:
        stmt = stmt.where(AuditEntry.action.startswith(action, autoescape=True))
    if actor:
        stmt = stmt.where(AuditEntry.actor == actor)
    if target:
        stmt = stmt.where(AuditEntry.target == target)
    async with ctx.reader() as db:
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    return AuditPage(
        items=[AuditOut(seq=e.seq, ts=iso(e.ts), actor=e.actor, action=e.action, target=e.target, detail=e.detail,
                        request_id=e.request_id, hash=e.hash) for e in rows],
        next_cursor=encode_cursor([rows[-1].seq]) if more else None,
    )


@router.get("/audit/verify", response_model=VerifyOut, summary="Verify the audit hash chain end to end")
async def verify_audit(ctx: Ctx, _: Admin) -> VerifyOut:
    async with ctx.reader() as db:
        r = await audit.verify(db, ctx.audit_key)
    return VerifyOut(ok=r.ok, entries=r.entries, problem=r.problem, seq=r.seq)
