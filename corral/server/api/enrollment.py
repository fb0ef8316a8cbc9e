"""Enrollment tokens: scoped secrets that admit devices (initial tags and groups, expiry, uses)."""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from corral.core.durations import parse_duration
from corral.errors import Conflict, InvalidInput, NotFound
from corral.server import registry
from corral.server.api.deps import Ctx, Operator, Paging, encode_cursor, rid
from corral.server.api.views import iso
from corral.server.auth import token_digest
from corral.server.store.models import EnrollmentToken, Group

router = APIRouter(tags=["enrollment"])


class TokenIn(BaseModel):
    tags: dict[str, str] = Field(default_factory=dict, description="tags given to devices that enroll")
    groups: list[str] = Field(default_factory=list, description="static groups they join")
    expires: str | None = Field(default=None, description="lifetime, e.g. 24h (default: never)")
    max_uses: int | None = Field(default=None, ge=1)
    description: str = Field(default="", max_length=500)


class TokenOut(BaseModel):
    id: str
    token: str | None = Field(default=None, description="the secret: shown only when created")
    tags: dict[str, str]
    groups: list[str]
    expires_at: str | None
    max_uses: int | None
    uses: int
    revoked: bool
    created_at: str | None
    created_by: str
    description: str


class TokenPage(BaseModel):
    items: list[TokenOut]
    next_cursor: str | None = None


def view(t: EnrollmentToken, secret: str | None = None) -> TokenOut:
    return TokenOut(id=t.id, token=secret, tags=t.tags or {}, groups=t.groups or [], expires_at=iso(t.expires_at),
                    max_uses=t.max_uses, uses=t.uses, revoked=t.revoked, created_at=iso(t.created_at),
                    created_by=t.created_by, description=t.description)


@router.post("/enrollment-tokens", response_model=TokenOut, status_code=201, summary="Create an enrollment token")
async def create_token(body: TokenIn, ctx: Ctx, who: Operator, request: Request) -> TokenOut:
    tags = registry.validate_tags(body.tags, ctx.config.limits)
    for g in body.groups:
        registry.validate_group_name(g, ctx.config.limits)
    ttl = parse_duration(body.expires) if body.expires else None
    now = time.time()
    secret = registry.new_enrollment_secret()
    async with ctx.writer() as db:
        for g in body.groups:
            grp = await db.get(Group, g)
            if grp is None:
                raise NotFound(f"no group {g!r}: create it first")
            if grp.selector is not None:
                raise InvalidInput(f"group {g!r} is dynamic: devices join it by its selector")
        row = EnrollmentToken(id=secrets.token_hex(6), token_hash=token_digest(secret), tags=tags,
                              groups=list(dict.fromkeys(body.groups)), expires_at=now + ttl if ttl else None,
                              max_uses=body.max_uses, uses=0, revoked=False, created_at=now, created_by=who.name,
                              description=body.description)
        db.add(row)
        await db.flush()
        await ctx.audit(db, who, "enrollment_token.create", row.id,
                        {"tags": tags, "groups": row.groups, "expires_at": row.expires_at, "max_uses": row.max_uses},
                        rid(request))
    return view(row, secret)


@router.get("/enrollment-tokens", response_model=TokenPage, summary="List enrollment tokens (secrets are not shown)")
async def list_tokens(ctx: Ctx, _: Operator, paging: Paging) -> TokenPage:
    stmt = select(EnrollmentToken).order_by(EnrollmentToken.id)
    if paging.cursor:
        stmt = stmt.where(EnrollmentToken.id > str(paging.cursor[0]))
    async with ctx.reader() as db:
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    return TokenPage(items=[view(t) for t in rows], next_cursor=encode_cursor([rows[-1].id]) if more else None)


@router.delete("/enrollment-tokens/{token_id}", response_model=TokenOut, summary="Revoke an enrollment token")
async def revoke_token(token_id: str, ctx: Ctx, who: Operator, request: Request) -> TokenOut:
    async with ctx.writer() as db:
        row = await db.get(EnrollmentToken, token_id)
        if row is None:
            raise NotFound(f"no enrollment token {token_id!r}")
        if row.revoked:
            raise Conflict(f"enrollment token {token_id!r} is already revoked")
        row.revoked = True
        await ctx.audit(db, who, "enrollment_token.revoke", token_id, {}, rid(request))
    return view(row)
