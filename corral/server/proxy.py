"""A device's local web UI through the server: ``/devices/ID/proxy/PORT/…``, HTTP and WebSocket
(issue 6, ADR 0018).

Each upstream connection is a remote-access ``forward`` session to the device's
``localhost:PORT``, with the server itself as the operator: :class:`_OperatorEnd` is the object
:meth:`Relay.operator <corral.server.remote.Relay.operator>` relays to instead of a WebSocket,
backed by two one-message slots (backpressure: one message held per direction). HTTP/1.1 is
spoken over the tunnel with ``h11``, WebSocket with ``websockets``' sans-I/O ``ClientProtocol``.

**The device is not trusted.** Its pages are served from the console's host but never run with
the console's origin: every response carries ``Content-Security-Policy: sandbox`` without
``allow-same-origin`` (an opaque origin: no access to the console's cookies, storage or API).
A sandboxed page's own requests carry none of the console's ``SameSite`` cookies, so the
browser reaches the proxy through a **capability URL**: the console's cookie (or a bearer
token) at ``/devices/ID/proxy/PORT/…`` buys a grant, bound to (user, device, port) and audited
once (``session.proxy``), and the browser is redirected to ``/devices/ID/proxy/PORT/~CAP/…``
(good from that browser's network address only, until the login ends or it is left unused),
under which relative assets, forms and WebSockets work without any cookie. The device's own
cookies are kept on the server, per grant (:class:`CookieJar`): the browser never stores a
cookie the device sets on the console's host. Nothing of the operator's credentials reaches the
device (``Cookie`` and ``Authorization`` are replaced or dropped).

The pure rules (paths, headers, redirects, cookies, preflights) are plain functions, tested
without a network (``tests/unit/test_proxy_rules.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote, urlsplit

import h11
import msgspec
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.typing import Origin, Subprotocol
from websockets.uri import parse_uri

from corral.errors import Conflict, CorralError, DeviceUnavailable, Forbidden, InvalidInput, NotFound, Unauthorized
from corral.server import remote
from corral.server.api.deps import SESSION_COOKIE, principal_of
from corral.server.api.errors import status_for
from corral.server.auth import Principal
from corral.server.config import WebProxy
from corral.server.context import ServerContext
from corral.server.store.models import Device

log = logging.getLogger(__name__)

#: the bytes of one tunnel message (the relay refuses more than remote.MAX_FRAME)
CHUNK = 64 * 1024
PROXY_PATH = "/devices/{device_id}/proxy/{port}"
#: what proxied documents may do: scripts, forms, pop-ups (sandboxed too), dialogs, downloads;
#: never ``allow-same-origin`` (the console's origin), nor to navigate a frame's top window
SANDBOX = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"
CAP_PREFIX = "~"
_CAP = re.compile(r"~[A-Za-z0-9_-]{43}")
#: where the device's app is, as it sees itself
TARGET_HOST = "localhost"
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}

# --- pure rules ---------------------------------------------------------------------------------

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-connection"})
#: request headers never forwarded: the operator's credentials and the console's CSRF token, the
#: browser's view of the origin (replaced by the target's), ``Expect`` (the server answered the
#: browser's ``100-continue`` already), forwarding claims by the client
DROP_REQUEST = frozenset({"host", "cookie", "authorization", "origin", "referer", "x-csrf-token", "expect",
                          "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                          "x-forwarded-prefix", "x-real-ip"})
#: response headers a device must not set on the console's host: cookies (kept on the server),
#: credential prompts (a password dialog on the console's origin), HSTS, site-data wipes,
#: service-worker scope, CORS and cross-origin isolation (the proxy sets its own)
DROP_RESPONSE = frozenset({"set-cookie", "set-cookie2", "www-authenticate", "strict-transport-security",
                           "clear-site-data", "service-worker-allowed", "alt-svc", "public-key-pins",
                           "cross-origin-resource-policy", "cross-origin-embedder-policy",
                           "cross-origin-opener-policy", "access-control-allow-origin",
                           "access-control-allow-credentials", "access-control-allow-methods",
                           "access-control-allow-headers", "access-control-expose-headers",
                           "access-control-max-age"})

Headers = list[tuple[bytes, bytes]]


def parse_port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and str(int(text)) == text and 0 < int(text) < 65536):
        raise InvalidInput(f"port must be a number in 1..65535, not {text[:20]!r}")
    return int(text)


def split_capability(path: str) -> tuple[str | None, str]:
    """``path`` (after ``/devices/ID/proxy/PORT/``) → (the capability or None, the rest)."""
    first, sep, rest = path.partition("/")
    if _CAP.fullmatch(first):
        return first[1:], sep + rest
    return None, "/" + path


def proxy_prefix(device_id: str, port: int, cap: str | None) -> str:
    base = PROXY_PATH.format(device_id=device_id, port=port)
    return f"{base}/{CAP_PREFIX}{cap}" if cap else base


def upstream_target(raw_path: bytes, prefix: str, query: bytes) -> bytes:
    """The request target on the device: the path without the proxy's prefix (as the browser
    encoded it), and the query."""
    pre = prefix.encode()
    rest = raw_path[len(pre):] if raw_path.startswith(pre) else b""
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest + (b"?" + query if query else b"")


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[str]:
    """The names a ``Connection`` header lists (hop-by-hop too, RFC 9110 §7.6.1)."""
    named: set[str] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            named.update(t.strip().lower() for t in v.decode("latin-1").split(",") if t.strip())
    return named


def request_headers(headers: Iterable[tuple[bytes, bytes]], port: int, cookie: str, *,
                    chunked: bool) -> Headers:
    """What goes to the device: end-to-end headers only, ``Host`` (and ``Origin``, when the
    browser sent one) the target's, ``Cookie`` only the device's own (the grant's jar), no
    ``Authorization``, no ``Sec-Fetch-*`` (the browser calls a sandboxed page's requests
    cross-site, which the app cannot act on)."""
    headers = list(headers)
    drop = HOP_BY_HOP | DROP_REQUEST | _connection_tokens(headers)
    target = f"{TARGET_HOST}:{port}".encode()
    out: Headers = [(b"host", target)]
    for k, v in headers:
        name = k.lower()
        if name.decode("latin-1") in drop or name.startswith(b"sec-fetch-"):
            if name == b"origin":
                out.append((b"origin", b"http://" + target))
            continue
        if name == b"content-length" and chunked:
            continue
        out.append((name, v))
    if cookie:
        out.append((b"cookie", cookie.encode("latin-1", "replace")))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    return out


def rewrite_location(value: str, prefix: str, port: int) -> str:
    """A redirect to the device's own root (``/x``, ``http://localhost:PORT/x``) goes into the
    proxy's prefix; relative ones and those to other hosts are left alone."""
    try:
        u = urlsplit(value)
        target_port = u.port
    except ValueError:
        return value
    if u.scheme or u.netloc:
        if u.scheme.lower() not in ("http", "https", "") or (u.hostname or "").lower() not in _LOOPBACK_NAMES:
            return value
        if (target_port or (443 if u.scheme.lower() == "https" else 80)) != port:
            return value
    elif not value.startswith("/"):
        return value
    out = prefix + (u.path or "/")
    if u.query:
        out += "?" + u.query
    if u.fragment:
        out += "#" + u.fragment
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]], prefix: str, port: int, *,
                     cors: bytes | None) -> tuple[Headers, list[str]]:
    """(what goes to the browser, the ``Set-Cookie`` values for the grant's jar). Every response
    is sandboxed; ``cors`` (the request's ``Origin``, ``b""`` without one): the capability's
    responses are readable by the sandboxed page itself, whose opaque origin makes its
    ``fetch``es, module scripts and fonts cross-origin (:func:`cors_headers`)."""
    headers = list(headers)
    drop = HOP_BY_HOP | DROP_RESPONSE | _connection_tokens(headers)
    out: Headers = []
    cookies: list[str] = []
    for k, v in headers:
        name = k.lower()
        if name == b"set-cookie":
            cookies.append(v.decode("latin-1"))
        if name.decode("latin-1") in drop:
            continue
        if name in (b"location", b"content-location"):
            v = rewrite_location(v.decode("latin-1"), prefix, port).encode("latin-1")
        out.append((name, v))
    out += security_headers()
    if cors is not None:
        out += cors_headers(cors, [k for k, _ in out])
    return out, cookies


def security_headers() -> Headers:
    return [(b"content-security-policy", SANDBOX.encode()), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"cross-origin")]


def cors_headers(origin: bytes, exposed: Iterable[bytes] = ()) -> Headers:
    """Who may read a capability's response: anyone holding the capability (``*``); and the
    sandboxed page's own opaque origin (``null``) even with ``credentials: "include"`` — there is
    nothing for it to carry (the console's cookie is ``SameSite=Strict``, the device's are kept
    by the server), so an app that asks for credentials works as it would at home."""
    if origin != b"null":
        return [(b"access-control-allow-origin", b"*"), (b"access-control-expose-headers", b"*")]
    out: Headers = [(b"access-control-allow-origin", b"null"), (b"access-control-allow-credentials", b"true"),
                    (b"vary", b"origin")]
    names = b", ".join(sorted(set(exposed)))
    if names:
        out.append((b"access-control-expose-headers", names))
    return out


def preflight(headers: Iterable[tuple[bytes, bytes]]) -> Headers | None:
    """A CORS preflight from the sandboxed page is answered by the proxy (the device's app
    knows nothing of the page's opaque origin): the headers of a 204, or None when the request
    is not a preflight (it goes to the device)."""
    h = {k.lower(): v for k, v in headers}
    method = h.get(b"access-control-request-method")
    if method is None or b"origin" not in h:
        return None
    out: Headers = [*cors_headers(h[b"origin"]), (b"access-control-allow-methods", method),
                    (b"access-control-max-age", b"600")]
    if b"access-control-request-headers" in h:
        out.append((b"access-control-allow-headers", h[b"access-control-request-headers"]))
    return out


@dataclass
class _Cookie:
    value: str
    expires: float | None


@dataclass
class CookieJar:
    """The device's cookies for one grant, kept on the server (RFC 6265, simplified: host-only,
    by name and path; ``Max-Age``/``Expires`` honoured; at most ``limit`` cookies)."""

    limit: int = 50
    max_bytes: int = 4096
    cookies: dict[tuple[str, str], _Cookie] = field(default_factory=dict)

    def store(self, set_cookie: str, request_path: str, now: float) -> None:
        first, *attrs = set_cookie.split(";")
        name, sep, value = first.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or len(set_cookie) > self.max_bytes:
            return
        path = _default_path(request_path)
        expires: float | None = None
        for attr in attrs:
            key, _, val = attr.partition("=")
            key, val = key.strip().lower(), val.strip()
            if key == "path" and val.startswith("/"):
                path = val
            elif key == "max-age":
                with contextlib.suppress(ValueError):
                    expires = now + int(val)
            elif key == "expires" and expires is None:
                with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
                    expires = email.utils.parsedate_to_datetime(val).timestamp()
        key_ = (name, path)
        if expires is not None and expires <= now:
            self.cookies.pop(key_, None)
            return
        if key_ not in self.cookies and len(self.cookies) >= self.limit:
            self._expire(now)
            if len(self.cookies) >= self.limit:
                return
        self.cookies[key_] = _Cookie(value, expires)

    def header(self, request_path: str, now: float) -> str:
        self._expire(now)
        matching = [(path, name, c.value) for (name, path), c in self.cookies.items()
                    if _path_matches(request_path, path)]
        matching.sort(key=lambda x: -len(x[0]))
        return "; ".join(f"{name}={value}" for _, name, value in matching)

    def _expire(self, now: float) -> None:
        for k in [k for k, c in self.cookies.items() if c.expires is not None and c.expires <= now]:
            del self.cookies[k]


def _default_path(request_path: str) -> str:
    path = request_path.split("?", 1)[0]
    if not path.startswith("/") or path.count("/") <= 1:
        return "/"
    return path[:path.rindex("/")]


def _path_matches(request_path: str, cookie_path: str) -> bool:
    path = request_path.split("?", 1)[0] or "/"
    if path == cookie_path:
        return True
    return path.startswith(cookie_path) and (cookie_path.endswith("/") or path[len(cookie_path)] == "/")


def is_navigation(method: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request is a browser loading a page (which a login page can answer)."""
    h = {k.lower(): v for k, v in headers}
    if method != "GET":
        return False
    if b"sec-fetch-mode" in h:
        return h[b"sec-fetch-mode"] == b"navigate"
    return b"text/html" in h.get(b"accept", b"")


def entry_allowed(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a navigation authenticated by the console's cookie alone may buy a capability:
    only one the user started (address bar, bookmark: ``none``) or one of the console's own
    pages (``same-origin``) — never another site, nor a device's sandboxed page (``cross-site``
    for its opaque origin), which could otherwise make the operator's browser request a
    device's page. A browser without Fetch Metadata is let through (``SameSite`` still holds)."""
    for k, v in headers:
        if k.lower() == b"sec-fetch-site":
            return v.strip().lower() in (b"same-origin", b"none")
    return True


# --- the tunnel: a forward session with the server as its operator --------------------------------


class UpstreamFailed(DeviceUnavailable):
    """The device, or its app, could not be reached or broke off (502)."""

    code = "bad_gateway"


class _Slot:
    """One message in flight in one direction: ``put`` waits until the last one was taken."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self.closed = False
        self._waiters: list[asyncio.Future[None]] = []

    def _wake(self) -> None:
        for f in self._waiters:
            if not f.done():
                f.set_result(None)
        self._waiters.clear()

    async def _wait(self) -> None:
        f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(f)
        await f

    async def put(self, item: Any) -> bool:
        while self._items and not self.closed:
            await self._wait()
        if self.closed:
            return False
        self._items.append(item)
        self._wake()
        return True

    async def get(self) -> Any:
        """The next item; None once closed and drained."""
        while not self._items and not self.closed:
            await self._wait()
        if not self._items:
            return None
        item = self._items.popleft()
        self._wake()
        return item

    def pending(self) -> bool:
        return bool(self._items)

    def close(self) -> None:
        self.closed = True
        self._wake()


class _OperatorEnd:
    """What :meth:`Relay.operator` relays to in place of an operator's WebSocket."""

    def __init__(self) -> None:
        self.outbox = _Slot()  # to the device
        self.inbox = _Slot()  # from the device
        self.reason = ""

    async def receive(self) -> Message:
        item = await self.outbox.get()
        if item is None:
            return {"type": "websocket.disconnect", "code": 1000}
        if isinstance(item, bytes):
            return {"type": "websocket.receive", "bytes": item}
        return {"type": "websocket.receive", "text": item}

    async def send_bytes(self, data: bytes) -> None:
        if not await self.inbox.put(data):
            raise RuntimeError("the proxy closed its end of the session")

    async def send_text(self, data: str) -> None:
        if not await self.inbox.put(data):
            raise RuntimeError("the proxy closed its end of the session")

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.reason = self.reason or reason or ""
        self.inbox.close()
        self.outbox.close()


class Tunnel:
    """A byte stream to the device's ``localhost:PORT``: one ``forward`` session."""

    def __init__(self, session_id: str, end: _OperatorEnd, task: asyncio.Task[None]) -> None:
        self.session_id = session_id
        self.end = end
        self.task = task
        self.http = h11.Connection(h11.CLIENT)
        self.eof = False
        self.error = ""
        self.reused = False
        self.idle_since = 0.0
        #: bytes received since the current request was sent (a reused connection that dies
        #: before answering anything is retried)
        self.received = 0

    async def send(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            if not await self.end.outbox.put(data[i:i + CHUNK]):
                raise UpstreamFailed(self.error or self.end.reason or "the session to the device ended")

    async def recv(self) -> bytes:
        """The next bytes from the app; ``b""`` once it has shut down its side.
        :class:`UpstreamFailed` when the device reports an error or the session ends."""
        while not self.eof:
            item = await self.end.inbox.get()
            if item is None:
                raise UpstreamFailed(self.error or self.end.reason or "the session to the device ended")
            if isinstance(item, bytes):
                self.received += len(item)
                return item
            ctl = _control(item)
            if ctl.type == "eof":
                self.eof = True
            elif ctl.type == "error":
                self.error = ctl.message or "the device reported an error"
                raise UpstreamFailed(self.error)
        return b""

    def usable(self) -> bool:
        return not (self.eof or self.error or self.task.done() or self.end.outbox.closed or self.end.inbox.pending())

    def shut(self) -> None:
        """End the session (the relay sees its operator leave and closes the device's side)."""
        self.end.inbox.close()
        self.end.outbox.close()


class _Control(msgspec.Struct):
    """A session's text message (ADR 0016): ``eof``, or ``error`` with its message."""

    type: str = ""
    message: str = ""


def _control(text: str) -> _Control:
    try:
        return msgspec.json.decode(text, type=_Control)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _Control()


# --- grants and the pool of connections ----------------------------------------------------------


@dataclass
class Grant:
    """One user's access to one device port through the proxy (its capability URL)."""

    id: str
    cap: str
    who: Principal
    credential: str
    #: the network address of the browser that last opened it through the console
    client: str
    device_id: str
    port: int
    created: float
    used: float
    jar: CookieJar
    idle: list[Tunnel] = field(default_factory=list)
    checked: float = 0.0

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.who.user_id, self.device_id, self.port)


def _digest(cap: str) -> str:
    return hashlib.sha256(cap.encode()).hexdigest()


class DeviceProxy:
    """This replica's grants and idle upstream connections."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.settings: WebProxy = ctx.config.proxy
        self.by_cap: dict[str, Grant] = {}
        self.by_key: dict[tuple[int, str, int], Grant] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # grants

    async def grant(self, who: Principal, credential: str, client: str, device_id: str, port: int,
                    request_id: str) -> Grant:
        """The grant of ``who`` for this device port: the live one, or a new one (audited).
        ``client``: the address its capability is good from (the latest authenticated one)."""
        now = time.time()
        async with self._lock:
            g = self.by_key.get((who.user_id, device_id, port))
            if g is not None and self._alive(g, now):
                g.used, g.who, g.credential, g.client, g.checked = now, who, credential, client, time.monotonic()
                return g
            await check_device(self.ctx, device_id)
            cap = secrets.token_urlsafe(32)
            g = Grant(id=secrets.token_hex(6), cap=cap, who=who, credential=credential, client=client,
                      device_id=device_id,
                      port=port, created=now, used=now, checked=time.monotonic(),
                      jar=CookieJar(self.settings.max_cookies, self.settings.max_cookie_bytes))
            async with self.ctx.writer() as db:
                await self.ctx.audit(db, who, "session.proxy", device_id, {"port": port, "grant": g.id}, request_id)
            self._forget(self.by_key.get(g.key))
            self.by_key[g.key] = g
            self.by_cap[_digest(cap)] = g
        self._start_reaper()
        return g

    async def by_capability(self, cap: str, device_id: str, port: int, client: str) -> Grant:
        """The grant whose capability this is, for a request from ``client``: a link that leaked
        (a device page's script can read its own address) is no use from another address."""
        g = self.by_cap.get(_digest(cap))
        now = time.time()
        if g is None or not self._alive(g, now) or g.device_id != device_id or g.port != port:
            raise NotFound("this link to the device's page is unknown or has expired: open it again from the console")
        if not hmac.compare_digest(g.client, client):
            raise Forbidden("this link to the device's page was opened from another network address: open it "
                            "again from the console")
        if time.monotonic() - g.checked > 5.0:  # the user may have logged out or lost the permission
            conn = HTTPConnection({"type": "http", "headers": [(b"authorization", f"Bearer {g.credential}".encode())]})
            try:
                who = await principal_of(conn, self.ctx)
            except Unauthorized:
                self._forget(g)
                raise Unauthorized("the console session that opened this page has ended: log in again") from None
            if not who.may_access_devices:
                self._forget(g)
                raise Forbidden(f"{who.name} does not have the remote-access permission")
            g.who, g.checked = who, time.monotonic()
        g.used = now
        return g

    def _alive(self, g: Grant, now: float) -> bool:
        s = self.settings
        return now - g.used < s.grant_idle_seconds and now - g.created < s.grant_max_seconds

    def _forget(self, g: Grant | None) -> None:
        if g is None:
            return
        if self.by_key.get(g.key) is g:
            del self.by_key[g.key]
        self.by_cap.pop(_digest(g.cap), None)
        for t in g.idle:
            t.shut()
        g.idle.clear()

    # connections

    async def open(self, g: Grant, request_id: str) -> Tunnel:
        """A new forward session to the grant's device port."""
        ctx = self.ctx
        assert ctx.relay is not None
        try:
            s, token = await remote.create(ctx, g.who, g.device_id, "forward", {"host": TARGET_HOST, "port": g.port},
                                           request_id)
        except Conflict as e:  # it went offline, or was decommissioned, since the grant
            raise DeviceUnavailable(e.detail) from None
        end = _OperatorEnd()
        task = asyncio.create_task(ctx.relay.operator(cast(WebSocket, end), s.id, token, g.who),
                                   name=f"proxy session {s.id}")
        # whichever way the relay ends, the proxy's reads and writes end too
        task.add_done_callback(lambda t: _ended(end, t))
        return Tunnel(s.id, end, task)

    async def acquire(self, g: Grant, request_id: str) -> Tunnel:
        while g.idle:
            t = g.idle.pop()
            if t.usable():
                t.reused = True
                t.received = 0
                return t
            t.shut()
        return await self.open(g, request_id)

    def release(self, g: Grant, t: Tunnel) -> None:
        """After a complete exchange: kept for the next request, or closed."""
        if t.http.our_state is h11.DONE and t.http.their_state is h11.DONE and t.usable() \
                and len(g.idle) < self.settings.max_idle and self.by_key.get(g.key) is g:
            t.http.start_next_cycle()
            t.idle_since = time.monotonic()
            g.idle.append(t)
            self._start_reaper()
        else:
            t.shut()

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="proxy reaper")

    async def _reap(self) -> None:
        """Close idle connections past their time and forget expired grants."""
        s = self.settings
        while self.by_key:
            await asyncio.sleep(min(s.idle_seconds / 2, 5.0))
            mono, now = time.monotonic(), time.time()
            for g in list(self.by_key.values()):
                if not self._alive(g, now):
                    self._forget(g)
                    continue
                keep = []
                for t in g.idle:
                    if mono - t.idle_since < s.idle_seconds and t.usable():
                        keep.append(t)
                    else:
                        t.shut()
                g.idle = keep


def _ended(end: _OperatorEnd, task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        end.reason = end.reason or f"the relay failed: {task.exception()}"
    end.inbox.close()
    end.outbox.close()


async def check_device(ctx: ServerContext, device_id: str) -> None:
    """A device the proxy can reach now, or the reason it cannot (404, 409, 503)."""
    async with ctx.reader() as db:
        device = await db.get(Device, device_id[:64])
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    if device.status != "accepted":
        raise Conflict(f"device {device_id} is {device.status}")
    if not device.online:
        raise DeviceUnavailable(f"device {device_id} is offline")


def instance(conn: HTTPConnection) -> DeviceProxy:
    state = conn.app.state
    proxy: DeviceProxy | None = getattr(state, "proxy", None)
    if proxy is None:
        proxy = state.proxy = DeviceProxy(state.ctx)
    return proxy


# --- who is asking ------------------------------------------------------------------------------


@dataclass
class _Route:
    grant: Grant
    prefix: str
    cap: bool


async def _route(conn: HTTPConnection, device_id: str, port_text: str, path: str) -> tuple[_Route | str, str]:
    """(the grant and the prefix to strip, or — for a browser that came with the console's
    cookie — the capability URL to go to instead; the path after the prefix)."""
    port = parse_port(port_text)
    proxy = instance(conn)
    cap, rest = split_capability(path)
    if cap is not None:
        g = await proxy.by_capability(cap, device_id, port, _client(conn))
        return _Route(g, proxy_prefix(device_id, port, cap), True), rest
    who = await principal_of(conn, proxy.ctx)
    if not who.may_access_devices:
        raise Forbidden(f"{who.name} does not have the remote-access permission")
    auth = conn.headers.get("authorization", "")
    credential = auth.partition(" ")[2].strip() if auth else conn.cookies.get(SESSION_COOKIE, "")
    from_cookie = not auth
    if from_cookie and conn.scope["type"] == "http":
        if conn.scope["method"] not in ("GET", "HEAD"):
            raise Forbidden("open a device's page with a link from the console (GET); its forms then go "
                            "to the page's own address")
        if not entry_allowed(conn.scope["headers"]):
            raise Forbidden("a device's page opens from the console or the address bar, not from another site")
    g = await proxy.grant(who, credential, _client(conn), device_id, port, getattr(conn.state, "request_id", "") or "")
    if from_cookie and conn.scope["type"] == "http":
        there = upstream_target(conn.scope.get("raw_path") or quote(conn.scope["path"]).encode(),
                                proxy_prefix(device_id, port, None), conn.scope.get("query_string", b""))
        return proxy_prefix(device_id, port, g.cap) + there.decode("latin-1"), rest
    return _Route(g, proxy_prefix(device_id, port, None), False), rest


def _client(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else ""


# --- HTTP ---------------------------------------------------------------------------------------


async def http(request: Request, device_id: str, port: str, path: str) -> Response:
    """``/devices/ID/proxy/PORT/PATH``, any method."""
    try:
        route, _ = await _route(request, device_id, port, path)
    except Unauthorized:
        if not is_navigation(request.scope["method"], request.scope["headers"]) or \
                split_capability(path)[0] is not None:
            raise
        # a browser that is not logged in: to the console's login, and back here after it
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(here, safe='')}", status_code=303)
    if isinstance(route, str):
        return RedirectResponse(route, status_code=303, headers=dict(
            (k.decode(), v.decode()) for k, v in security_headers()))
    if route.cap and request.method == "OPTIONS":
        allowed = preflight(request.scope["headers"])
        if allowed is not None:
            return Response(status_code=204, headers={k.decode(): v.decode() for k, v in allowed})
    return _Exchange(instance(request), route, getattr(request.state, "request_id", "") or "")


class _Exchange(Response):
    """The upstream exchange, run as the response (so that it streams both ways)."""

    def __init__(self, proxy: DeviceProxy, route: _Route, request_id: str) -> None:
        super().__init__()
        self.proxy = proxy
        self.route = route
        self.request_id = request_id
        self.started = False
        self.released = False
        self.origin = b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._run(scope, receive, send)
        except CorralError as e:
            if self.started:
                raise
            status = 502 if isinstance(e, UpstreamFailed) else status_for(e)
            log.info("proxy %s %s: %s", self.route.grant.device_id, scope["path"], e.detail)
            await JSONResponse({"error": e.code, "detail": e.detail, "request_id": self.request_id},
                               status_code=status, headers={"x-content-type-options": "nosniff"})(scope, receive, send)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        g, port = self.route.grant, self.route.grant.port
        self.origin = next((v for k, v in scope["headers"] if k == b"origin"), b"")
        target = upstream_target(scope.get("raw_path") or scope["path"].encode(), self.route.prefix,
                                 scope.get("query_string", b""))
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        body, more = first.get("body", b""), first.get("more_body", False)
        has_length = any(k == b"content-length" for k, _ in scope["headers"])
        chunked = (more or bool(body)) and not has_length
        try:
            head = h11.Request(method=scope["method"], target=target,
                               headers=request_headers(scope["headers"], port,
                                                       g.jar.header(target.decode("latin-1"), time.time()),
                                                       chunked=chunked))
        except h11.LocalProtocolError as e:
            raise InvalidInput(f"this request cannot be passed on to the device: {e}") from None
        for attempt in (1, 2):
            t = await self.proxy.acquire(g, self.request_id)
            self.released = False
            try:
                await self._exchange(t, head, body, more, receive, send, target.decode("latin-1"))
            except _ClientGone:
                self._drop(t)
                return
            except UpstreamFailed as e:
                self._drop(t)
                if self.started:  # the browser gets a truncated response: the status was sent already
                    log.warning("proxy %s %s: %s after the response started", g.device_id, scope["path"], e.detail)
                    return
                # a kept connection that the app had closed meanwhile: once more on a new one
                if attempt == 1 and t.reused and t.received == 0 and not more:
                    continue
                raise
            except BaseException:
                self._drop(t)
                raise
            self._release(t)
            return

    def _release(self, t: Tunnel) -> None:
        if not self.released:
            self.released = True
            self.proxy.release(self.route.grant, t)

    def _drop(self, t: Tunnel) -> None:
        if not self.released:  # (once given back, it may be another request's already)
            t.shut()

    async def _exchange(self, t: Tunnel, head: h11.Request, body: bytes, more: bool, receive: Receive,
                        send: Send, target: str) -> None:
        conn = t.http

        async def upload() -> None:
            """The request body, then the client's disconnect (if it goes away first)."""
            await t.send(conn.send(head) or b"")
            if body:
                await t.send(conn.send(h11.Data(data=body)) or b"")
            more_body = more
            while more_body:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                if data := message.get("body", b""):
                    await t.send(conn.send(h11.Data(data=data)) or b"")
                more_body = message.get("more_body", False)
            await t.send(conn.send(h11.EndOfMessage()) or b"")
            while (await receive())["type"] != "http.disconnect":
                pass
            raise _ClientGone

        up = asyncio.create_task(upload())
        down = asyncio.create_task(self._respond(t, send, target))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if down in done:
                down.result()
                if up.done() and not up.cancelled() and up.exception() is not None \
                        and not isinstance(up.exception(), _ClientGone):
                    raise cast(BaseException, up.exception())
                return
            exc = up.exception()
            if isinstance(exc, _ClientGone):  # or the response is complete (uvicorn says so the same way)
                finished, _ = await asyncio.wait({down}, timeout=0.05)
                if finished:
                    down.result()
                    return
            raise cast(BaseException, exc)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    async def _respond(self, t: Tunnel, send: Send, target: str) -> None:
        conn = t.http
        g = self.route.grant
        while True:
            event = await _next_event(t)
            if isinstance(event, h11.Response):
                break
        headers, cookies = response_headers(event.headers.raw_items(), self.route.prefix, g.port,
                                            cors=self.origin if self.route.cap else None)
        now = time.time()
        for c in cookies:
            g.jar.store(c, target, now)
        await send({"type": "http.response.start", "status": event.status_code, "headers": headers})
        self.started = True
        while True:  # h11 ends an answer with EndOfMessage, or _next_event raises
            event = await _next_event(t)
            if isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.DONE:
                    # given back before the browser has the end of the answer, so that its next
                    # request finds the connection free
                    self._release(t)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return


class _ClientGone(Exception):
    pass


async def _next_event(t: Tunnel) -> Any:
    """The next h11 event from the app (reading from the tunnel as needed), not ``NEED_DATA``."""
    conn = t.http
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            if t.eof and conn.their_state is h11.SEND_RESPONSE:
                raise UpstreamFailed("the app on the device closed the connection before it answered") from None
            if t.eof:
                raise UpstreamFailed("the app on the device closed the connection in the middle of its answer") \
                    from None
            raise UpstreamFailed(f"the app on the device broke HTTP/1.1: {e}") from None
        if event is h11.NEED_DATA:
            data = await t.recv()
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            raise UpstreamFailed("the app on the device closed the connection before it answered")
        if isinstance(event, h11.InformationalResponse):
            continue
        return event


# --- WebSocket ----------------------------------------------------------------------------------


async def websocket(ws: WebSocket, device_id: str, port: str, path: str) -> None:
    """``/devices/ID/proxy/PORT/PATH`` upgraded: the app's WebSocket, relayed message by message."""
    t: Tunnel | None = None
    try:
        route, _ = await _route(ws, device_id, port, path)
        if isinstance(route, str):  # (only for HTTP)
            raise InvalidInput("open the page first")
        proxy = instance(ws)
        target = upstream_target(ws.scope.get("raw_path") or ws.scope["path"].encode(), route.prefix,
                                 ws.scope.get("query_string", b"")).decode("latin-1")
        t = await proxy.open(route.grant, "")
        upstream = _Upstream(t, route.grant, target, proxy.settings.max_ws_message,
                             list(ws.scope.get("subprotocols") or []))
        try:
            early = await asyncio.wait_for(upstream.handshake(), proxy.settings.ws_handshake_seconds)
        except TimeoutError:
            raise UpstreamFailed(f"the app on the device did not answer the WebSocket handshake in "
                                 f"{proxy.settings.ws_handshake_seconds:g} s") from None
    except CorralError as e:
        if t is not None:
            t.shut()
        await _deny(ws, e)
        return
    try:
        await ws.accept(subprotocol=upstream.proto.subprotocol)
        await upstream.relay(ws, early)
    finally:
        t.shut()


async def _deny(ws: WebSocket, e: CorralError) -> None:
    status = 502 if isinstance(e, UpstreamFailed) else status_for(e)
    # (uvicorn 0.54's sans-I/O WebSocket logs "returned without completing handshake" after a
    # denial response it did send: the client gets the status and the reason all the same)
    with contextlib.suppress(OSError, RuntimeError):  # the browser may have gone
        if "websocket.http.response" in ws.scope.get("extensions", {}):
            await ws.send_denial_response(JSONResponse({"error": e.code, "detail": e.detail}, status_code=status))
        else:
            await ws.close(1008 if status < 500 else 1011, e.detail[:120])


#: how long the app has to answer a close the browser started
CLOSE_WAIT = 2.0
#: close codes a peer may not send (RFC 6455 §7.4.1), and what the other side is told instead
_UNSENDABLE = {1005: 1000, 1006: 1011, 1015: 1011}


class _Upstream:
    """The app's WebSocket over the tunnel (``websockets``' sans-I/O client)."""

    def __init__(self, t: Tunnel, g: Grant, target: str, max_size: int, subprotocols: list[str]) -> None:
        self.t = t
        self.g = g
        self.target = target
        #: offering the browser's subprotocols, without compression (the browser's own leg may have it)
        self.proto = ClientProtocol(parse_uri(f"ws://{TARGET_HOST}:{g.port}{target}"),
                                    origin=Origin(f"http://{TARGET_HOST}:{g.port}"),
                                    subprotocols=[Subprotocol(s) for s in subprotocols] or None, max_size=max_size)
        self._write = asyncio.Lock()

    async def flush(self) -> None:
        async with self._write:
            data = b"".join(self.proto.data_to_send())
            if data:
                await self.t.send(data)

    async def handshake(self) -> list[Frame]:
        """Upgrade on the app; the frames that came with its answer. :class:`UpstreamFailed`
        when it refuses."""
        request = self.proto.connect()
        cookie = self.g.jar.header(self.target, time.time())
        if cookie:
            request.headers["Cookie"] = cookie
        self.proto.send_request(request)
        await self.flush()
        while self.proto.handshake_exc is None and self.proto.state.name == "CONNECTING":
            data = await self.t.recv()
            if data:
                self.proto.receive_data(data)
            else:
                self.proto.receive_eof()
            events = self.proto.events_received()
            if events:
                if self.proto.handshake_exc is not None:
                    break
                return [e for e in events if isinstance(e, Frame)]
        exc = self.proto.handshake_exc
        detail = str(exc) if isinstance(exc, InvalidHandshake) else "no answer"
        raise UpstreamFailed(f"the app on the device refused the WebSocket: {detail}")

    async def relay(self, ws: WebSocket, early: list[Frame]) -> None:
        """Both ways, one message at a time, until either side closes (its code passed on)."""
        closed: dict[str, Any] = {}

        async def from_browser() -> None:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    code = int(message.get("code") or 1000)
                    code = _UNSENDABLE.get(code, code)
                    with contextlib.suppress(ProtocolError, CorralError):
                        self.proto.send_close(code, str(message.get("reason") or ""))
                        await self.flush()
                    closed.setdefault("by", "browser")
                    return
                if message.get("bytes") is not None:
                    self.proto.send_binary(message["bytes"])
                else:
                    self.proto.send_text((message.get("text") or "").encode())
                await self.flush()

        async def from_app() -> None:
            assembler = _Assembler()
            await self._deliver(ws, early, assembler)
            while self.proto.close_rcvd is None and not self.proto.close_expected():
                try:
                    data = await self.t.recv()
                except UpstreamFailed as e:
                    closed.update(code=1011, reason=e.detail)
                    return
                if data:
                    self.proto.receive_data(data)
                else:
                    self.proto.receive_eof()
                await self.flush()
                if not await self._deliver(ws, self.proto.events_received(), assembler):
                    break
            rcvd = self.proto.close_rcvd
            if rcvd is None:
                closed.update(code=1011, reason="the app on the device went away")
            else:
                closed.update(code=_UNSENDABLE.get(rcvd.code, rcvd.code), reason=rcvd.reason)

        tasks = [asyncio.create_task(from_browser()), asyncio.create_task(from_app())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done and not tasks[1].done():  # the app's answer to the close, briefly
                await asyncio.wait([tasks[1]], timeout=CLOSE_WAIT)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if closed.get("by") != "browser":
            with contextlib.suppress(Exception):
                await ws.close(int(closed.get("code", 1011)), str(closed.get("reason", ""))[:120])

    async def _deliver(self, ws: WebSocket, frames: Iterable[Any], assembler: _Assembler) -> bool:
        for frame in frames:
            if not isinstance(frame, Frame):
                continue
            if frame.opcode is Opcode.CLOSE:
                return False
            message = assembler.add(frame)
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            elif isinstance(message, str):
                await ws.send_text(message)
        return True


class _Assembler:
    """Fragments into messages (the protocol bounds their total size by ``max_size``)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.text = False

    def add(self, frame: Frame) -> bytes | str | None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self.parts, self.text = [bytes(frame.data)], frame.opcode is Opcode.TEXT
        elif frame.opcode is Opcode.CONT:
            self.parts.append(bytes(frame.data))
        else:
            return None  # ping, pong: the protocol answers pings itself
        if not frame.fin:
            return None
        data, self.parts = b"".join(self.parts), []
        return data.decode("utf-8", "replace") if self.text else data

