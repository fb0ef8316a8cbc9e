"""Request-scoped dependencies: the server context, the caller and their role, paging.

A caller presents an API token (``Authorization: Bearer``) or the web console's session cookie.
The cookie is sent by the browser on its own, so a request that carries only the cookie must
also prove it comes from one of our pages (docs/adr/0017-web-console.md): a mutating request
needs the session's CSRF token (``X-CSRF-Token`` or the form's ``csrf_token``), and a
WebSocket needs this server's ``Origin``. Bearer-token calls are unaffected.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from corral.errors import Forbidden, InvalidInput, Unauthorized
from corral.server.auth import Principal, csrf_token_ok, origin_allowed, resolve_token, touch_statement
from corral.server.context import ServerContext

SESSION_COOKIE = "corral_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FORM_FIELD = "csrf_token"
#: methods that change nothing (RFC 9110 §9.2.1), so the cookie alone may call them
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def get_ctx(request: Request) -> ServerContext:
    # async on purpose: FastAPI runs plain-function dependencies on a thread pool
    return ctx_of(request)


def ctx_of(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ServerContext, Depends(get_ctx)]


def presented_token(request: HTTPConnection) -> tuple[str | None, bool]:
    """The caller's token and whether it came from the console's cookie (not a header)."""
    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization header must be 'Bearer <token>'")
        return value.strip(), False
    cookie = request.cookies.get(SESSION_COOKIE)
    return cookie, bool(cookie)


def bearer_token(request: HTTPConnection) -> str | None:
    return presented_token(request)[0]


def check_cookie_request(request: HTTPConnection, session_token: str, public_url: str,
                         csrf: str | None = None) -> None:
    """Refuse what a cookie alone must not do: a cross-site WebSocket (hijacking), or a
    mutating request without the session's CSRF token (``csrf`` is the form's, if any)."""
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    if request.scope["type"] == "websocket":
        if not origin_allowed(origin, host, public_url):
            raise Forbidden(f"a WebSocket authenticated by the console's cookie must come from this server's "
                            f"pages, not from origin {origin or '(none)'}")
        return
    if request.scope["method"] in SAFE_METHODS:
        return
    if origin is not None and not origin_allowed(origin, host, public_url):
        raise Forbidden(f"cross-site request refused (origin {origin})")
    if not csrf_token_ok(session_token, csrf or request.headers.get(CSRF_HEADER)):
        raise Forbidden("a request authenticated by the console's cookie needs the page's CSRF token "
                        "(X-CSRF-Token header): reload the page")


#: How long a resolved token is trusted without asking the database again. A revoked token, a
#: disabled user or a changed role takes effect within this on other replicas (at once on this one
#: for logout). It spares every API request a database round trip.
TOKEN_CACHE_SECONDS = 5.0
TOKEN_CACHE_MAX = 10_000


async def get_principal(request: Request, ctx: Ctx) -> Principal:
    return await principal_of(request, ctx)


async def principal_of(request: HTTPConnection, ctx: ServerContext, csrf: str | None = None) -> Principal:
    """The caller of a request or WebSocket: its bearer token, or the console's session cookie
    (checked by :func:`check_cookie_request`; ``csrf`` is a form's CSRF field)."""
    token, from_cookie = presented_token(request)
    if not token:
        raise Unauthorized("an API token is required (Authorization: Bearer <token>)")
    if from_cookie:
        check_cookie_request(request, token, ctx.config.public_url, csrf)
    now = time.monotonic()
    cached = ctx.token_cache.get(token)
    if cached is not None and cached[0] > now:
        principal = cached[1]
    else:
        async with ctx.reader() as db:
            principal = await resolve_token(db, token)
        if principal.stale_last_used:
            ctx.commits.execute_later(touch_statement(principal.token_id), "recording a token's last use")
        if len(ctx.token_cache) >= TOKEN_CACHE_MAX:
            ctx.token_cache.clear()
        ctx.token_cache[token] = (now + TOKEN_CACHE_SECONDS, principal)
    request.state.principal = principal
    return principal


def require(role: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that admits callers with at least ``role``."""

    async def dep(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.has_role(role):
            raise Forbidden(f"this needs the {role} role; {principal.name} is {principal.role}")
        return principal

    return dep


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def rid(request: Request) -> str:
    return getattr(request.state, "request_id", "") or ""


# --- paging ---------------------------------------------------------------------------------


class Page(BaseModel):
    """One page of a list. Pass ``next_cursor`` back as ``cursor`` for the next one."""

    items: list[Any]
    next_cursor: str | None = None


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> list[Any]:
    try:
        pad = "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(cursor + pad))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput("cursor is not valid: pass next_cursor from the previous page") from e
    if not isinstance(values, list):
        raise InvalidInput("cursor is not valid: pass next_cursor from the previous page")
    return values


class PageParams:
    def __init__(self, limit: int, cursor: list[Any] | None) -> None:
        self.limit = limit
        self.cursor = cursor


async def page_params(
    request: Request,
    limit: Annotated[int | None, Query(ge=1, description="items per page")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> PageParams:
    limits = ctx_of(request).config.limits
    if limit is not None and limit > limits.max_page_size:
        raise InvalidInput(f"limit must be at most {limits.max_page_size}")
    return PageParams(limit or limits.default_page_size, decode_cursor(cursor) if cursor else None)


Paging = Annotated[PageParams, Depends(page_params)]
