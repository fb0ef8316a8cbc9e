"""The web console (issue 7; docs/console.md, ADR 0017): server-rendered pages, no build step.

Pages are Jinja2 templates (autoescaped) under ``corral/web/templates``; the little JavaScript
they need is our own ES modules under ``corral/web/static``, and the npm packages (xterm.js,
uPlot) are served from ``corral/web/node_modules`` through :data:`VENDOR`, an explicit allow-list
of files — node_modules is never served wholesale.

The console's login is an API token like any other (named ``console``, expiring after
:data:`SESSION_SECONDS`) held in the ``corral_session`` cookie: HttpOnly, SameSite=Strict, Secure
when the server is reached over https. What the cookie alone may not do is refused in
``corral.server.api.deps`` (CSRF token for mutating requests, Origin for WebSockets), for these
pages and for the REST API alike. Every page carries a Content-Security-Policy without inline
script; the pages that run xterm.js allow its ``<style>`` elements by a per-response nonce.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote

import jinja2
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from sqlalchemy import select

from corral.errors import CorralError, Forbidden, InvalidInput, NotFound, Unauthorized
from corral.server import console_device, remote
from corral.server.api.auth import log_in, log_out
from corral.server.api.deps import (
    CSRF_FORM_FIELD,
    SESSION_COOKIE,
    Ctx,
    PageParams,
    decode_cursor,
    presented_token,
    principal_of,
    rid,
)
from corral.server.api.devices import TagChange, change_tags, page_of_devices, selector_clause
from corral.server.api.errors import status_for
from corral.server.api.monitoring import list_events, metric_names
from corral.server.api.views import DeviceOut, device_views, iso
from corral.server.auth import Principal, csrf_token
from corral.server.context import ServerContext
from corral.server.live import sse
from corral.server.store.models import Device, RemoteSession

WEB = Path(__file__).resolve().parent.parent / "web"
TEMPLATES = WEB / "templates"
STATIC = WEB / "static"
NODE_MODULES = WEB / "node_modules"

#: the npm files the console may load, by the path it asks for under /static/vendor/
VENDOR: dict[str, str] = {
    "xterm/xterm.mjs": "@xterm/xterm/lib/xterm.mjs",
    "xterm/xterm.css": "@xterm/xterm/css/xterm.css",
    "xterm/addon-fit.mjs": "@xterm/addon-fit/lib/addon-fit.mjs",
    "uplot/uPlot.esm.js": "uplot/dist/uPlot.esm.js",
    "uplot/uPlot.min.css": "uplot/dist/uPlot.min.css",
}
MEDIA_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
               ".png": "image/png"}

#: a console login lasts a working day; logging out revokes it at once
SESSION_SECONDS = 12 * 3600
#: the login form's own CSRF cookie (double submit): there is no session to bind a token to yet
LOGIN_CSRF_COOKIE = "corral_login_csrf"
DEVICES_PER_PAGE = 50
SESSIONS_SHOWN = 200
MAX_FORM_BYTES = 16 * 1024


@dataclass(frozen=True)
class NavItem:
    """A section of the console; ``shown`` says whether a user sees it (the server checks anyway)."""

    key: str
    href: str
    label: str
    shown: Callable[[Principal], bool]


NAV: tuple[NavItem, ...] = (
    NavItem("dashboard", "/", "Dashboard", lambda who: True),
    NavItem("devices", "/devices", "Devices", lambda who: True),
    NavItem("groups", "/groups", "Groups", lambda who: True),
    NavItem("rollouts", "/rollouts", "Rollouts", lambda who: True),
    NavItem("artifacts", "/artifacts", "Artifacts", lambda who: True),
    NavItem("alerts", "/alerts", "Alerts", lambda who: True),
    NavItem("webhooks", "/webhooks", "Webhooks", lambda who: who.has_role("operator")),
    NavItem("audit", "/audit", "Audit", lambda who: True),
    NavItem("sessions", "/sessions", "Sessions", lambda who: who.may_access_devices),
)


# --- pure helpers ------------------------------------------------------------------------------


def content_security_policy(style_nonce: str | None = None) -> str:
    """The pages' CSP: our own files only, no inline script, no framing. xterm.js writes
    ``<style>`` elements and a few ``style`` attributes at run time: on its pages those are
    allowed by the response's nonce (elements) and ``style-src-attr`` (attributes)."""
    directives = ["default-src 'self'", "script-src 'self'", "connect-src 'self'", "img-src 'self' data:",
                  "frame-ancestors 'none'", "object-src 'none'", "base-uri 'none'", "form-action 'self'"]
    if style_nonce:
        directives += [f"style-src 'self' 'nonce-{style_nonce}'", "style-src-attr 'unsafe-inline'"]
    else:
        directives.append("style-src 'self'")
    return "; ".join(directives)


def security_headers(style_nonce: str | None = None) -> dict[str, str]:
    return {"Content-Security-Policy": content_security_policy(style_nonce),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store"}


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this server only (no ``//host`` or ``/\\host``
    that a browser would take for another site), else the device list."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or any(
            c in target for c in "\r\n\t\\"):
        return "/devices"
    return target


def parse_form(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the console's forms are small and flat)."""
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20))
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInput("the form could not be read") from e


def device_name(d: DeviceOut) -> str:
    return d.tags.get("name") or str(d.inventory.get("hostname") or "")


def may_replay(who: Principal, s: RemoteSession) -> bool:
    """Recordings are for admins and the session's own user (as ``GET .../recording``)."""
    return who.role == "admin" or (who.may_access_devices and who.user_id == s.user_id)


def when(ts: float | None) -> str:
    """A moment for people: UTC to the second (the ``datetime`` attribute keeps the exact one)."""
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# --- rendering ---------------------------------------------------------------------------------

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_env.filters["bytes"] = human_bytes
_env.filters["iso"] = iso
_env.filters["when"] = when


def render(request: Request, template: str, who: Principal | None, status: int = 200, style_nonce: str | None = None,
           **values: Any) -> HTMLResponse:
    token, from_cookie = presented_token(request) if who is not None else (None, False)
    html = _env.get_template(template).render(
        who=who, nav=[n for n in NAV if who is not None and n.shown(who)], path=request.url.path,
        csrf=csrf_token(token) if token and from_cookie else "", style_nonce=style_nonce or "",
        request_id=rid(request), **values)
    return HTMLResponse(html, status_code=status, headers=security_headers(style_nonce))


class ConsoleRoute(APIRoute):
    """A console route: errors become pages (a missing login goes to the login page), and every
    response carries the security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except Unauthorized:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                response = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            except CorralError as e:
                status = status_for(e)
                response = render(request, "error.html", getattr(request.state, "principal", None),
                                  status=status, status_code=status, detail=e.detail)
            for k, v in security_headers().items():
                response.headers.setdefault(k, v)
            return response

        return route


router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)


async def signed_in(request: Request, ctx: Ctx) -> Principal:
    return await principal_of(request, ctx)


Who = Annotated[Principal, Depends(signed_in)]


async def read_form(request: Request) -> dict[str, str]:
    """A console form's fields; an empty body is an empty form (refused later for its missing
    CSRF token, as any other)."""
    body = await request.body()
    if not body:
        return {}
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise InvalidInput("expected a form (application/x-www-form-urlencoded)")
    if len(body) > MAX_FORM_BYTES:
        raise InvalidInput("the form is too large")
    return parse_form(body)


async def form_principal(request: Request, ctx: ServerContext, form: dict[str, str]) -> Principal:
    """The caller of a console form: the cookie, with the form's CSRF token."""
    return await principal_of(request, ctx, csrf=form.get(CSRF_FORM_FIELD))


def secure_cookies(request: Request, ctx: ServerContext) -> bool:
    return cookies_secure(ctx.config.public_url, request.url.scheme)


def cookies_secure(public_url: str, scheme: str) -> bool:
    """Whether cookies get ``Secure``: when the browser reaches us over https (the public URL, or
    the request's scheme, which uvicorn takes from a local proxy's X-Forwarded-Proto). Over plain
    http a Secure cookie would never come back."""
    return public_url.startswith("https://") or scheme == "https"


# --- login and logout ----------------------------------------------------------------------------


def login_page(request: Request, ctx: ServerContext, next_path: str, user: str = "", error: str = "",
               status: int = 200) -> HTMLResponse:
    nonce = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, status=status, next_path=next_path, user=user, error=error,
                      login_csrf=nonce)
    response.set_cookie(LOGIN_CSRF_COOKIE, nonce, max_age=3600, path="/login", httponly=True, samesite="strict",
                        secure=secure_cookies(request, ctx))
    return response


@router.get("/login")
async def login_form(request: Request, ctx: Ctx, next: str | None = None) -> Response:
    try:
        await principal_of(request, ctx)
    except CorralError:
        return login_page(request, ctx, safe_next(next))
    return RedirectResponse(safe_next(next), status_code=303)  # already signed in


@router.post("/login")
async def login_submit(request: Request, ctx: Ctx) -> Response:
    form = await read_form(request)
    next_path = safe_next(form.get("next"))
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected, form.get(CSRF_FORM_FIELD, "")):
        return login_page(request, ctx, next_path, form.get("user", ""), status=403,
                          error="The login form expired. Please try again.")
    try:
        _, secret, _ = await log_in(ctx, form.get("user", "")[:64], form.get("password", "")[:1024], "console",
                                       SESSION_SECONDS, rid(request))
    except Unauthorized:
        return login_page(request, ctx, next_path, form.get("user", ""), status=401,
                          error="Wrong user name or password.")
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(SESSION_COOKIE, secret, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="strict",
                        secure=secure_cookies(request, ctx))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.post("/logout")
async def logout(request: Request, ctx: Ctx) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    await log_out(ctx, who, presented_token(request)[0], rid(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                           secure=secure_cookies(request, ctx))
    return response


# --- devices -------------------------------------------------------------------------------------


@router.get("/devices")
async def devices_page(request: Request, ctx: Ctx, who: Who,
                       selector: Annotated[str, Query(max_length=4096)] = "",
                       sort: Annotated[str, Query(max_length=32)] = "id",
                       cursor: Annotated[str | None, Query(max_length=512)] = None) -> Response:
    error = ""
    stmt = select(Device)
    items: Sequence[DeviceOut] = []
    next_cursor = None
    order = console_device.list_sort(sort)
    try:
        clause = selector_clause(selector, ctx.config.limits.max_selector_len)
        if clause is not None:
            stmt = stmt.where(clause)
        paging = PageParams(DEVICES_PER_PAGE, decode_cursor(cursor) if cursor else None)
        async with ctx.reader() as db:
            page = await page_of_devices(db, stmt, order, paging)
        items, next_cursor = page.items, page.next_cursor
    except InvalidInput as e:  # a selector that does not parse is shown beside the search box
        error = e.detail
    rows = [{"device": d, "name": device_name(d)} for d in items]
    return render(request, "devices.html", who, rows=rows, selector=selector, error=error, next_cursor=next_cursor,
                  sort=order, columns=console_device.LIST_COLUMNS, sort_links=console_device.sort_links(order))


async def load_device(ctx: ServerContext, device_id: str) -> tuple[Device, DeviceOut]:
    """The device's row (its raw times) and its API view (tags, groups, inventory)."""
    async with ctx.reader() as db:
        d = await db.get(Device, device_id[:64])
        if d is None:
            raise NotFound(f"no device {device_id!r}")
        return d, (await device_views(db, [d]))[0]


async def device_view(request: Request, ctx: ServerContext, who: Principal, device_id: str, status: int = 200,
                      tag_error: str = "", tag_form: dict[str, str] | None = None, edit_tag: str = "") -> Response:
    """The device page: inventory, tags (a form for operators), the chart's metrics and ranges,
    events, deployment history, and the remote-access buttons for whom may use them."""
    row, d = await load_device(ctx, device_id)
    if tag_form is None and edit_tag in d.tags:  # "Edit" fills the tag form with the tag
        tag_form = {"key": edit_tag, "value": d.tags[edit_tag]}
    inventory = {k: v for k, v in d.inventory.items() if not isinstance(v, dict | list)}
    metrics = (await metric_names(ctx, who, device=d.id, prefix=None)).items
    events = (await list_events(ctx, who, PageParams(console_device.EVENTS_SHOWN, None), device=d.id, selector=None,
                                severity=None, source=None, since=None)).items
    async with ctx.reader() as db:
        history = await console_device.deployment_history(db, d.id)
    ranges = [(r, console_device.range_params(r.key)) for r in console_device.TIME_RANGES]
    return render(request, "device.html", who, status=status, device=d, name=device_name(d), inventory=inventory,
                  software=d.inventory.get("software") or {}, last_seen=row.last_seen,
                  ready=d.status == "accepted" and d.online, may_tag=who.has_role("operator"),
                  tag_error=tag_error, tag_form=tag_form or {}, metrics=metrics,
                  metric=console_device.first_metric(metrics), ranges=ranges,
                  default_range=console_device.DEFAULT_RANGE, events=events, history=history)


@router.get("/devices/{device_id}")
async def device_page(request: Request, ctx: Ctx, who: Who, device_id: str,
                      tag: Annotated[str, Query(max_length=64)] = "") -> Response:
    return await device_view(request, ctx, who, device_id, edit_tag=tag)


@router.post("/devices/{device_id}/tags")
async def device_tags_form(request: Request, ctx: Ctx, device_id: str) -> Response:
    """The tag form: one tag set or removed through the API's own change (validated, audited);
    a refusal is shown on the page with the form as it was sent."""
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    require_role(who, "operator", "changing tags")
    try:
        tags, remove = console_device.tag_change(form)
        await change_tags(device_id[:64], TagChange(set=tags, remove=remove), ctx, who, request)
    except InvalidInput as e:
        return await device_view(request, ctx, who, device_id, status=400, tag_error=e.detail, tag_form=form)
    return RedirectResponse(f"/devices/{quote(device_id, safe='')}#tags-h", status_code=303)


def require_role(who: Principal, role: str, what: str) -> None:
    """What an API route's role dependency checks, for a console form that calls its function."""
    if not who.has_role(role):
        raise Forbidden(f"{what} needs the {role} role; {who.name} is {who.role}")


def still_signed_in(request: Request, ctx: ServerContext) -> Callable[[], Awaitable[bool]]:
    """For a live stream: whether its viewer's login still holds (re-checked each interval, so a
    logout or a revoked token ends the stream; the token cache bounds the cost)."""
    async def check() -> bool:
        try:
            await principal_of(request, ctx)
        except CorralError:
            return False
        return True

    return check


@router.get("/devices/{device_id}/live")
async def device_live(request: Request, ctx: Ctx, who: Who, device_id: str) -> Response:
    """The device's presence as server-sent events (corral.server.live): online, last seen."""
    row, _ = await load_device(ctx, device_id)

    async def snapshot() -> dict[str, Any]:
        async with ctx.reader() as db:
            d = await db.get(Device, row.id)
        if d is None:
            return {"gone": True}
        return {"online": bool(d.online), "status": d.status, "last_seen": iso(d.last_seen),
                "last_seen_text": when(d.last_seen)}

    return sse(request, snapshot, allowed=still_signed_in(request, ctx))


@router.get("/devices/{device_id}/web-ui")
async def device_web_ui(ctx: Ctx, who: Who, device_id: str,
                        port: Annotated[str, Query(max_length=16)] = "") -> Response:
    """The **Device web UI** form: on to the device proxy's entry for that port (ADR 0018)."""
    if not who.may_access_devices:
        raise Forbidden(f"{who.name} does not have the remote-access permission")
    row, _ = await load_device(ctx, device_id)
    return RedirectResponse(console_device.proxy_entry(quote(row.id, safe=""), port), status_code=303)


@router.get("/devices/{device_id}/terminal")
async def terminal_page(request: Request, ctx: Ctx, who: Who, device_id: str) -> Response:
    if not who.may_access_devices:
        raise Forbidden(f"{who.name} does not have the remote-access permission")
    _, d = await load_device(ctx, device_id)
    return render(request, "terminal.html", who, device=d, name=device_name(d),
                  style_nonce=secrets.token_urlsafe(16))


# --- remote-access sessions ------------------------------------------------------------------------


async def sessions_for(ctx: ServerContext, who: Principal) -> list[RemoteSession]:
    """Admins see every session; an operator with remote access sees their own."""
    if who.role == "admin":
        return await remote.recent(ctx, False, SESSIONS_SHOWN)
    stmt = (select(RemoteSession).where(RemoteSession.user_id == who.user_id)
            .order_by(RemoteSession.created_at.desc()).limit(SESSIONS_SHOWN))
    async with ctx.reader() as db:
        return list((await db.scalars(stmt)).all())


@router.get("/sessions")
async def sessions_page(request: Request, ctx: Ctx, who: Who) -> Response:
    if not who.may_access_devices:
        raise Forbidden("remote-access sessions are for admins and operators with the remote-access permission")
    rows = await sessions_for(ctx, who)
    return render(request, "sessions.html", who, sessions=rows, live=("pending", "connecting", "open"),
                  now=time.time())


@router.post("/sessions/{session_id}/end")
async def end_session(request: Request, ctx: Ctx, session_id: str) -> Response:
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    if who.role != "admin":
        raise Forbidden("only admins end sessions")
    await remote.end(ctx, who, session_id[:32], rid(request))
    return RedirectResponse("/sessions", status_code=303)


@router.get("/sessions/{session_id}/playback")
async def playback_page(request: Request, ctx: Ctx, who: Who, session_id: str) -> Response:
    async with ctx.reader() as db:
        s = await db.get(RemoteSession, session_id[:32])
    if s is None or not s.recording:
        raise NotFound(f"no recording of session {session_id!r}")
    if not may_replay(who, s):
        raise Forbidden("recordings are for admins and the session's own user")
    return render(request, "playback.html", who, session=s, style_nonce=secrets.token_urlsafe(16))


# --- static files ----------------------------------------------------------------------------------


def static_file(path: Path) -> FileResponse:
    if not path.is_file():
        raise NotFound("no such file")
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


@router.get("/static/vendor/{name:path}")
async def vendor_file(name: str) -> FileResponse:
    """An npm file on the allow-list (installed by ``make venv``: npm ci in corral/web)."""
    target = VENDOR.get(name)
    if target is None:
        raise NotFound(f"no vendor file {name!r}")
    path = NODE_MODULES / target
    if not path.is_file():
        raise NotFound(f"{name} is not installed: run 'make venv' (npm ci in corral/web)")
    return static_file(path)


@router.get("/static/{name}")
async def own_file(name: str) -> FileResponse:
    """The console's own modules and styles (flat names only: nothing outside the folder)."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or Path(name).suffix not in MEDIA_TYPES:
        raise NotFound(f"no file {name!r}")
    return static_file(STATIC / name)
