"""Operators: log in for a token, manage tokens and users (admin)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import delete, select

from corral.core.durations import parse_duration
from corral.errors import Conflict, InvalidInput, NotFound
from corral.server import auth
from corral.server.api.deps import Admin, Ctx, Paging, Viewer, bearer_token, encode_cursor, rid
from corral.server.api.views import iso
from corral.server.auth import Principal
from corral.server.context import ServerContext
from corral.server.store.models import ApiToken, User

router = APIRouter(tags=["operators"])


class LoginIn(BaseModel):
    user: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    token_name: str = Field(default="login", max_length=128)
    expires: str | None = Field(default=None, description="token lifetime, e.g. 30d (default: never)")


class TokenOut(BaseModel):
    id: str
    token: str | None = None
    name: str
    user: str
    role: str
    created_at: str | None
    expires_at: str | None
    last_used_at: str | None = None


class UserOut(BaseModel):
    name: str
    role: str
    disabled: bool
    remote_access: bool = Field(default=False, description="may open terminals, forwards and file transfers")
    created_at: str | None


class UserPage(BaseModel):
    items: list[UserOut]
    next_cursor: str | None = None


class UserIn(BaseModel):
    name: str
    role: str
    password: str | None = Field(default=None, max_length=1024)
    remote_access: bool = False


class UserChange(BaseModel):
    role: str | None = None
    disabled: bool | None = None
    remote_access: bool | None = None
    password: str | None = Field(default=None, max_length=1024)


class WhoAmI(BaseModel):
    user: str
    role: str
    token_id: str


def user_view(u: User) -> UserOut:
    return UserOut(name=u.name, role=u.role, disabled=u.disabled, remote_access=bool(u.remote_access),
                   created_at=iso(u.created_at))


async def log_in(ctx: ServerContext, name: str, password: str, token_name: str, ttl: float | None,
                 request_id: str) -> tuple[User, str, ApiToken]:
    """Check a password and issue a token (the API's login and the console's), audited."""
    async with ctx.writer() as db:
        user = await auth.authenticate_password(db, name, password)
        secret, row = await auth.issue_token(db, user, token_name, ttl)
        await ctx.audit(db, f"user:{user.name}", "auth.login", user.name, {"token": row.id}, request_id)
    return user, secret, row


async def log_out(ctx: ServerContext, who: Principal, token: str | None, request_id: str) -> None:
    """Revoke the token the caller presented (at once on this replica), audited."""
    if token:
        ctx.token_cache.pop(token, None)
    async with ctx.writer() as db:
        await db.execute(delete(ApiToken).where(ApiToken.id == who.token_id))
        await ctx.audit(db, who, "auth.logout", who.name, {"token": who.token_id}, request_id)


@router.post("/auth/login", response_model=TokenOut, summary="Exchange a user name and password for an API token")
async def login(body: LoginIn, ctx: Ctx, request: Request) -> TokenOut:
    ttl = parse_duration(body.expires) if body.expires else None
    user, secret, row = await log_in(ctx, body.user, body.password, body.token_name, ttl, rid(request))
    return TokenOut(id=row.id, token=secret, name=row.name, user=user.name, role=user.role,
                    created_at=iso(row.created_at), expires_at=iso(row.expires_at))


@router.get("/auth/whoami", response_model=WhoAmI, summary="Who the presented token belongs to")
async def whoami(who: Viewer) -> WhoAmI:
    return WhoAmI(user=who.name, role=who.role, token_id=who.token_id)


@router.post("/auth/logout", status_code=204, summary="Revoke the presented token")
async def logout(ctx: Ctx, who: Viewer, request: Request) -> Response:
    await log_out(ctx, who, bearer_token(request), rid(request))
    return Response(status_code=204)


@router.get("/users", response_model=UserPage, summary="List users")
async def list_users(ctx: Ctx, _: Admin, paging: Paging) -> UserPage:
    stmt = select(User).order_by(User.name)
    if paging.cursor:
        stmt = stmt.where(User.name > str(paging.cursor[0]))
    async with ctx.reader() as db:
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    return UserPage(items=[user_view(u) for u in rows], next_cursor=encode_cursor([rows[-1].name]) if more else None)


@router.post("/users", response_model=UserOut, status_code=201, summary="Create a user")
async def create_user(body: UserIn, ctx: Ctx, who: Admin, request: Request) -> UserOut:
    async with ctx.writer() as db:
        u = await auth.create_user(db, body.name, body.role, body.password)
        u.remote_access = body.remote_access
        await ctx.audit(db, who, "user.create", u.name, {"role": u.role, "remote_access": u.remote_access},
                        rid(request))
    return user_view(u)


@router.patch("/users/{name}", response_model=UserOut, summary="Change a user's role, password or disabled flag")
async def change_user(name: str, body: UserChange, ctx: Ctx, who: Admin, request: Request) -> UserOut:
    if body.role is not None:
        auth.validate_role(body.role)
    if body.password is not None and len(body.password) < 8:
        raise InvalidInput("password must be at least 8 characters")
    async with ctx.writer() as db:
        u = await db.scalar(select(User).where(User.name == name))
        if u is None:
            raise NotFound(f"no user {name!r}")
        if u.name == who.name and (body.disabled or (body.role and body.role != "admin")):
            raise Conflict("you cannot demote or disable yourself")
        changes: dict[str, object] = {}
        if body.role is not None:
            changes["role"] = u.role = body.role
        if body.disabled is not None:
            u.disabled = body.disabled
            changes["disabled"] = body.disabled
        if body.remote_access is not None:
            changes["remote_access"] = u.remote_access = body.remote_access
        if body.password is not None:
            u.password_hash = auth.hash_password(body.password)
            changes["password"] = "changed"
        await ctx.audit(db, who, "user.change", name, changes, rid(request))
    ctx.token_cache.clear()  # a role or disabled change takes effect at once on this replica
    return user_view(u)


class ApiTokenIn(BaseModel):
    name: str = Field(default="", max_length=128)
    expires: str | None = None


@router.post("/auth/tokens", response_model=TokenOut, status_code=201, summary="Create an API token for yourself")
async def create_api_token(body: ApiTokenIn, ctx: Ctx, who: Viewer, request: Request) -> TokenOut:
    ttl = parse_duration(body.expires) if body.expires else None
    async with ctx.writer() as db:
        user = await db.get(User, who.user_id)
        assert user is not None
        secret, row = await auth.issue_token(db, user, body.name, ttl)
        await ctx.audit(db, who, "auth.token_create", user.name, {"token": row.id, "name": body.name}, rid(request))
    return TokenOut(id=row.id, token=secret, name=row.name, user=user.name, role=user.role,
                    created_at=iso(row.created_at), expires_at=iso(row.expires_at))


@router.get("/auth/tokens", response_model=list[TokenOut], summary="Your API tokens (secrets are not shown)")
async def list_api_tokens(ctx: Ctx, who: Viewer) -> list[TokenOut]:
    async with ctx.reader() as db:
        rows = (await db.scalars(select(ApiToken).where(ApiToken.user_id == who.user_id)
                                 .order_by(ApiToken.created_at))).all()
    now = time.time()
    return [TokenOut(id=t.id, name=t.name, user=who.name, role=who.role, created_at=iso(t.created_at),
                     expires_at=iso(t.expires_at), last_used_at=iso(t.last_used_at))
            for t in rows if t.expires_at is None or t.expires_at > now]
