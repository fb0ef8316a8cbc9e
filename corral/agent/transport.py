"""The agent's WebSocket client: RFC 6455 on an asyncio protocol, frames and handshake by wsproto.

The agent needs one thing of a WebSocket library: a client connection that sends and receives
binary frames. ``websockets`` costs ~5 MB of resident memory in every agent (it imports
``importlib.metadata``, ``email`` and ``http.client``); this module, on the sans-I/O ``wsproto``
(and ``h11`` for the upgrade request), costs ~1.7 MB (ADR 0008). What it does::

    async with connect("wss://host/device/v1/connect", subprotocol="corral.v1", ...) as ws:
        await ws.send(b"...")          # one binary message; waits while the socket is full
        frame = await ws.recv()        # the next message, bytes (or str for a text frame)
        await ws.close(1001, "bye")    # closing handshake, at most close_timeout

* **Opening**: TCP (directly, through an HTTP(S) proxy with ``CONNECT``, or a SOCKS proxy when
  ``python-socks`` is installed), TLS with the stdlib ``ssl`` for ``wss://`` (the system's CA
  store), then the HTTP/1.1 upgrade offering one subprotocol, which the server must select.
  The whole of it is bounded by ``open_timeout`` (``TimeoutError``).
* **Failures** are :class:`HandshakeError` (a bad URL or proxy, a proxy that refused, a
  response that is not a valid upgrade, a missing or different subprotocol),
  :class:`InvalidStatus` (the server answered with another HTTP status), ``OSError`` (the
  network), and, once open, :class:`ConnectionClosed` from ``recv``/``send`` with the close
  code the server sent (``None``: the connection ended without a close frame).
* **Limits**: a message larger than ``max_size`` bytes fails the connection with 1009 (too
  big), a frame wsproto cannot parse with the code it gives (1002, 1007); either way the server
  gets a close frame and ``recv`` raises :class:`ConnectionClosed`. At most :data:`MAX_QUEUE`
  received messages wait for ``recv``; beyond that the socket is not read (TCP backpressure).
* **Pings** from the server are answered; this side never pings (the agent's heartbeat
  detects dead connections).
* ``proxy_from_environment`` resolves ``https_proxy``/``no_proxy`` and friends the way
  ``urllib.request`` does on POSIX, without importing it (it pulls ``http.client`` and
  ``email``, the memory this module exists to save).

The :class:`WebSocket` protocol object is the I/O seam: tests feed it bytes with
``data_received`` and read what it wrote from a fake transport, no network needed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import SplitResult, unquote, urlsplit

from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

#: received messages kept for ``recv`` before the socket is no longer read
MAX_QUEUE = 16
#: bytes a proxy's answer to CONNECT may take (status line and headers)
MAX_PROXY_RESPONSE = 16 * 1024
#: the close codes this module sends when it fails a connection
TOO_BIG = 1009
GOING_AWAY = 1001
NORMAL = 1000


class WebSocketError(Exception):
    """Base of this module's errors."""


class HandshakeError(WebSocketError):
    """The connection did not become a WebSocket (bad URL or proxy, a refusing proxy, an
    invalid upgrade response, a missing or different subprotocol)."""


class InvalidStatus(HandshakeError):
    """The server answered the upgrade request with another HTTP status than 101."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"server rejected WebSocket connection: HTTP {status_code}")
        self.status_code = status_code


class ConnectionClosed(WebSocketError):
    """The connection is closed (or closing): ``code`` and ``reason`` are what the server sent
    (``code`` ``None``: no close frame came), ``sent`` the code this side sent, if any, and
    ``failure`` why this side failed the connection, if it did (a message over ``max_size``,
    a frame it could not parse)."""

    def __init__(self, code: int | None, reason: str = "", sent: int | None = None,
                 failure: str | None = None) -> None:
        if failure is not None:
            text = f"failed the connection: {failure}"
        elif code is not None:
            text = f"received {code} ({reason or 'no reason'})"
        else:
            text = "no close frame received"
        super().__init__(text + (f"; sent {sent}" if sent is not None and failure is None else ""))
        self.code = code
        self.reason = reason
        self.sent = sent
        self.failure = failure


# --- addresses --------------------------------------------------------------------------------


class AsciiHost(str):
    """A host name (or ``host:port``) in ASCII, as :func:`parse_url` and :func:`parse_proxy`
    return it: an internationalized name is already in its IDNA (``xn--``) form.

    ``wsproto`` (for the Host header) and ``ssl`` (for the SNI name) encode a ``str`` host with
    the ``idna`` codec whatever it holds. For an ASCII name that gives the bytes ``ascii`` gives,
    but the codec's first use imports ``encodings.idna``, ``stringprep`` and ``unicodedata``:
    ~0.4 MB of RSS in every agent that connects to an ASCII host (ADR 0007). This ``str`` answers
    a request for IDNA with its ASCII bytes; :func:`_ascii_host` made sure that is what the codec
    would have returned. (The resolver gets ASCII bytes: see :func:`_tcp_connect`.)"""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return super().encode("ascii" if encoding == "idna" else encoding, errors)


def _ascii_host(host: str, what: str) -> AsciiHost:
    """``host`` as an :class:`AsciiHost`: a non-ASCII name converted by the ``idna`` codec (its
    only use), an ASCII one kept, with the codec's check (no empty label, none over 63)."""
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            return AsciiHost(host.encode("idna").decode("ascii"))
        except UnicodeError as e:
            raise HandshakeError(f"invalid {what}: {e}") from None
    labels = host.split(".")
    if not all(0 < len(label) < 64 for label in labels[:-1]) or len(labels[-1]) >= 64:
        raise HandshakeError(f"invalid {what}: a label of {host!r} is empty or too long")
    return AsciiHost(host)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a ``ws://`` or ``wss://`` URL points."""

    secure: bool
    host: AsciiHost
    port: int
    #: path and query, as the request line carries them
    resource: str

    @property
    def authority(self) -> str:
        """``host:port`` with IPv6 addresses in brackets (a CONNECT request's target)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def host_header(self) -> AsciiHost:
        """The Host header: the port only when it is not the scheme's default."""
        default = 443 if self.secure else 80
        return AsciiHost(self.authority if self.port != default else self.authority.rsplit(":", 1)[0])


def _split(url: str, what: str) -> tuple[SplitResult, int | None]:
    """``urlsplit`` and the port, a malformed URL (bad port, bracket) a :class:`HandshakeError`."""
    try:
        parts = urlsplit(url)
        return parts, parts.port
    except ValueError as e:
        raise HandshakeError(f"invalid {what}: {e}") from None


def parse_url(url: str) -> Target:
    """``ws://`` or ``wss://`` URL → :class:`Target`; :class:`HandshakeError` if it is not one."""
    parts, port = _split(url, f"WebSocket URL {url!r}")
    if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.username is not None:
        raise HandshakeError(f"invalid WebSocket URL {url!r}")
    secure = parts.scheme == "wss"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = _ascii_host(parts.hostname, f"WebSocket URL {url!r}")
    return Target(secure, host, port or (443 if secure else 80), resource)


@dataclass(frozen=True, slots=True)
class Proxy:
    scheme: str
    host: AsciiHost
    port: int
    username: str | None = None
    password: str | None = None


_PROXY_SCHEMES = ("http", "https", "socks5h", "socks5", "socks4a", "socks4")


def parse_proxy(url: str) -> Proxy:
    """A proxy URL (``http://``, ``https://``, ``socks5h://`` ...) → :class:`Proxy`."""
    parts, port = _split(url, "proxy URL")
    if parts.scheme not in _PROXY_SCHEMES:
        raise HandshakeError(f"invalid proxy URL: scheme {parts.scheme!r} is not supported")
    if not parts.hostname:
        raise HandshakeError("invalid proxy URL: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise HandshakeError("invalid proxy URL: a proxy URL has no path, query or fragment")
    user = password = None
    if parts.username is not None:
        if parts.password is None:
            raise HandshakeError("invalid proxy URL: a user name without a password")
        user, password = unquote(parts.username, errors="strict"), unquote(parts.password, errors="strict")
    default = {"http": 80, "https": 443}.get(parts.scheme, 1080)
    return Proxy(parts.scheme, _ascii_host(parts.hostname, "proxy URL"), port or default, user, password)


def _environment_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """``urllib.request.getproxies_environment``: ``<scheme>_proxy`` variables, the lowercase
    ones winning; ``HTTP_PROXY`` ignored in a CGI script (CVE-2016-1000110)."""
    proxies = {}
    for name, value in environ.items():
        lname = name.lower()
        if value and lname[-6:] == "_proxy":
            proxies[lname[:-6]] = value
    if "REQUEST_METHOD" in environ:
        proxies.pop("http", None)
    for name, value in environ.items():
        if name[-6:] == "_proxy":
            lname = name.lower()
            if value:
                proxies[lname[:-6]] = value
            else:
                proxies.pop(lname[:-6], None)
    return proxies


def _bypass(host: str, port: int, no_proxy: str | None) -> bool:
    """``urllib.request.proxy_bypass_environment`` for ``host:port``."""
    if no_proxy is None:
        return False
    if no_proxy == "*":
        return True
    hostport = f"{host}:{port}".lower()
    hostonly = host.lower()
    for name in no_proxy.split(","):
        name = name.strip().lstrip(".").lower()
        if not name:
            continue
        if name in (hostonly, hostport) or hostonly.endswith("." + name) or hostport.endswith("." + name):
            return True
    return False


def proxy_from_environment(url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL for a WebSocket URL from the environment, or ``None`` (also for a host in
    ``no_proxy``). As RFC 6455 suggests, a SOCKS proxy first, then the HTTPS one (and for
    ``ws://`` the HTTP one); ``wss_proxy``/``ws_proxy`` above all (the rules of ``websockets``)."""
    target = parse_url(url)
    proxies = _environment_proxies(os.environ if environ is None else environ)
    if _bypass(target.host, target.port, proxies.get("no")):
        return None
    schemes = ("wss", "socks", "https") if target.secure else ("ws", "socks", "https", "http")
    for scheme in schemes:
        proxy = proxies.get(scheme)
        if proxy is not None:
            if scheme == "socks" and proxy.startswith("http://"):
                proxy = "socks5h://" + proxy[7:]
            return proxy
    return None


def connect_request(proxy: Proxy, target: Target, user_agent: str | None) -> bytes:
    """The ``CONNECT`` request that opens a tunnel to ``target`` through an HTTP(S) proxy."""
    lines = [f"CONNECT {target.authority} HTTP/1.1", f"Host: {target.host_header}"]
    if user_agent:
        lines.append(f"User-Agent: {user_agent}")
    if proxy.username is not None:
        creds = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {creds}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def proxy_status(head: bytes) -> int:
    """The status code of a proxy's answer (its status line and headers)."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise HandshakeError(f"the proxy did not answer with HTTP: {line[:80]!r}")
    return int(parts[1])


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """One verifying context (the system's CA store) for every connection of the process:
    loading the CA store per connection would cost each of ``corral sim``'s agents."""
    return ssl.create_default_context()


# --- the connection ---------------------------------------------------------------------------


class WebSocket(asyncio.Protocol):
    """One client WebSocket: the asyncio protocol of its socket (see the module doc).

    Created by :func:`connect`; tests drive it directly (``connection_made`` with a fake
    transport, ``data_received``)."""

    __slots__ = (
        "_done",
        "_drain_waiters",
        "_handshake",
        "_lost",
        "_messages",
        "_opened",
        "_parts",
        "_paused_reading",
        "_paused_writing",
        "_request",
        "_size",
        "_transport",
        "_waiter",
        "_ws",
        "close_code",
        "close_reason",
        "close_timeout",
        "failure",
        "max_size",
        "sent_code",
        "subprotocol",
    )

    def __init__(self, request: Request, *, max_size: int, close_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._request = request
        self.subprotocol = request.subprotocols[0] if request.subprotocols else None
        self.max_size = max_size
        self.close_timeout = close_timeout
        self._handshake: H11Handshake | None = H11Handshake(ConnectionType.CLIENT)
        self._ws: Connection | None = None
        self._transport: asyncio.Transport | None = None
        self._opened: asyncio.Future[None] = loop.create_future()
        self._lost: asyncio.Future[None] = loop.create_future()
        self._messages: deque[bytes | str] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] | None = None
        self._parts: list[bytes | str] | None = None
        self._size = 0
        self._paused_reading = False
        self._paused_writing = False
        #: no more messages will come: the close frames were exchanged or the socket is gone
        self._done = False
        #: what the server sent in its close frame (``None``: none came)
        self.close_code: int | None = None
        self.close_reason = ""
        #: the close code this side sent, if any
        self.sent_code: int | None = None
        #: why this side failed the connection (a message too big, a frame it cannot parse)
        self.failure: str | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports, in ``corral sim``, are not asyncio.Transport subclasses)
        self._transport = transport = cast(asyncio.Transport, transport)
        assert self._handshake is not None
        transport.write(self._handshake.send(self._request))

    def data_received(self, data: bytes) -> None:
        if self._handshake is not None:
            self._handshake_received(data)
        elif self._ws is not None and self._ws.state in (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING):
            self._ws.receive_data(data)
            self._process()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._transport = None
        if not self._opened.done():
            reason = f": {exc}" if exc is not None else ""
            self._opened.set_exception(HandshakeError(f"connection closed during the opening handshake{reason}"))
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake()
        for w in self._drain_waiters or ():
            if not w.done():
                w.set_result(None)  # _drain sees _done and raises
        self._drain_waiters = None

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        for w in self._drain_waiters or ():
            if not w.done():
                w.set_result(None)
        self._drain_waiters = None

    # --- receiving ----------------------------------------------------------------------------

    def _handshake_received(self, data: bytes) -> None:
        hs = self._handshake
        assert hs is not None and self._transport is not None
        try:
            hs.receive_data(data)
            for event in hs.events():
                if isinstance(event, AcceptConnection):
                    if event.subprotocol != self.subprotocol:
                        got = f"subprotocol {event.subprotocol}" if event.subprotocol else "no subprotocol"
                        raise HandshakeError(f"the server accepted {got}, not {self.subprotocol}")
                    self._handshake, self._ws = None, hs.connection
                    self._opened.set_result(None)
                    self._process()  # frames that came with the upgrade response
                    return
                if isinstance(event, RejectConnection):
                    raise InvalidStatus(event.status_code)
        except (RemoteProtocolError, LocalProtocolError) as e:
            self._fail_handshake(HandshakeError(f"invalid upgrade response: {e}"))
        except HandshakeError as e:
            self._fail_handshake(e)

    def _fail_handshake(self, exc: HandshakeError) -> None:
        self._handshake = None
        if not self._opened.done():
            self._opened.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    def _process(self) -> None:
        ws = self._ws
        assert ws is not None
        for event in ws.events():
            if isinstance(event, Message):
                if ws.state is not ConnectionState.OPEN:
                    continue  # closing: nobody reads any more
                self._size += len(event.data)
                if self._size > self.max_size:
                    self._fail(TOO_BIG, f"message over {self.max_size} bytes")
                    return
                if not event.message_finished:
                    if self._parts is None:
                        self._parts = []
                    self._parts.append(event.data)
                    continue
                message = event.data
                if self._parts is not None:
                    self._parts.append(message)
                    message = (b"" if isinstance(message, bytes) else "").join(self._parts)  # type: ignore[arg-type]
                    self._parts = None
                self._size = 0
                self._messages.append(message)
                if len(self._messages) >= MAX_QUEUE and not self._paused_reading and self._transport is not None:
                    self._paused_reading = True
                    self._transport.pause_reading()
                self._wake()
            elif isinstance(event, Ping):
                self._write(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.OPEN:  # wsproto could not parse a frame
                    self._fail(int(event.code), event.reason or "protocol error")
                    return
                if ws.state is ConnectionState.LOCAL_CLOSING:  # likewise, while closing
                    self._abort()
                    return
                self.close_code, self.close_reason = int(event.code), event.reason or ""
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    self._write(ws.send(event.response()))
                self._done = True
                if self._transport is not None:
                    self._transport.close()  # the server has closed its side; no TCP to wait for
                self._wake()
                return

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection: a close frame with ``code``, then wait (at most close_timeout)
        for the server's; ``recv`` raises from now on."""
        ws = self._ws
        assert ws is not None
        self._messages.clear()
        self._parts = None
        self.failure = reason
        if ws.state is ConnectionState.OPEN:
            self.sent_code = code
            self._write(ws.send(CloseConnection(code=code, reason=reason[:120])))
        self._done = True
        self._wake()
        if self._transport is not None:
            asyncio.get_running_loop().call_later(self.close_timeout, self._abort)

    def _abort(self) -> None:
        self._done = True
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _closed(self) -> ConnectionClosed:
        return ConnectionClosed(self.close_code, self.close_reason, self.sent_code, self.failure)

    # --- the API ------------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection at once (no closing handshake)."""
        if not self._opened.done():
            self._opened.cancel()  # nobody waits for it any more
        self._abort()

    async def opened(self) -> None:
        """Wait for the upgrade response (raises what made the handshake fail)."""
        await self._opened

    async def recv(self) -> bytes | str:
        """The next message; :class:`ConnectionClosed` once the connection is closing or closed.
        One caller at a time."""
        while not self._messages:
            if self._done:
                raise self._closed()
            if self._waiter is not None:
                raise RuntimeError("recv() is already being awaited")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._messages.popleft()
        if self._paused_reading and len(self._messages) < MAX_QUEUE // 2 and self._transport is not None:
            self._paused_reading = False
            self._transport.resume_reading()
        return message

    async def send(self, data: bytes | str) -> None:
        """Send one message (binary for bytes, text for str); waits while the socket's write
        buffer is full."""
        ws = self._ws
        if ws is None or ws.state is not ConnectionState.OPEN or self._done or self._transport is None:
            raise self._closed()
        message = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        self._transport.write(ws.send(message))
        if self._paused_writing:
            waiter = asyncio.get_running_loop().create_future()
            if self._drain_waiters is None:
                self._drain_waiters = []
            self._drain_waiters.append(waiter)
            await waiter
            if self._transport is None:
                raise self._closed()

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        """The closing handshake: send a close frame, wait (at most ``close_timeout``) for the
        server's and for the end of the connection, then drop the socket."""
        ws = self._ws
        if ws is not None and ws.state is ConnectionState.OPEN and self._transport is not None:
            self.sent_code = code
            self._write(ws.send(CloseConnection(code=code, reason=reason)))
            self._messages.clear()
            self._wake()
        if self._lost.done():
            return
        try:
            async with asyncio.timeout(self.close_timeout):
                await asyncio.shield(self._lost)
        except TimeoutError:
            pass
        finally:
            if self._transport is not None:
                self._transport.abort()  # a peer that did not close in time (or a cancellation)


async def _socks_socket(proxy: Proxy, target: Target) -> socket.socket:
    """A socket connected to ``target`` through a SOCKS proxy (the optional ``python-socks``)."""
    try:
        from python_socks import ProxyType
        from python_socks.async_.asyncio import Proxy as SocksProxy
    except ImportError:
        raise HandshakeError("a SOCKS proxy needs the python-socks package installed") from None
    kind = ProxyType.SOCKS5 if proxy.scheme.startswith("socks5") else ProxyType.SOCKS4
    socks = SocksProxy(kind, proxy.host, proxy.port, proxy.username, proxy.password,
                       rdns=proxy.scheme in ("socks5h", "socks4a"))
    try:
        sock: socket.socket = await socks.connect(target.host, target.port)
    except OSError:
        raise
    except Exception as e:  # python-socks' own errors
        raise HandshakeError(f"the SOCKS proxy failed: {e}") from e
    return sock


class _Tunnel(asyncio.Protocol):
    """Sends ``CONNECT`` to an HTTP(S) proxy and waits for its answer."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head = bytearray()
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        try:
            if end < 0:
                if len(self.head) > MAX_PROXY_RESPONSE:
                    raise HandshakeError("the proxy's answer to CONNECT is too long")
                return
            status = proxy_status(bytes(self.head[:end]))
            if not 200 <= status < 300:
                raise HandshakeError(f"proxy rejected connection: HTTP {status}")
            self.answered.set_result(None)
        except HandshakeError as e:
            self.answered.set_exception(e)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(HandshakeError("the proxy closed the connection before answering CONNECT"))


async def _tcp_connect(host: AsciiHost, port: int) -> socket.socket:
    """A TCP socket connected to ``host``, its addresses tried in the resolver's order (as
    ``loop.create_connection`` tries them). The resolver gets the name as ASCII bytes: given a
    ``str``, ``socket.getaddrinfo`` encodes it with the ``idna`` codec (see :class:`AsciiHost`)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host.encode("ascii"), port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned no address")
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as e:
            sock.close()
            errors.append(e)
        except BaseException:
            sock.close()
            raise
    if len({str(e) for e in errors}) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")


async def _connection(factory: Callable[[], asyncio.Protocol], sock: socket.socket, tls: ssl.SSLContext | None,
                      hostname: AsciiHost) -> asyncio.Transport:
    """``sock`` under the protocol (``tls``: after the TLS handshake with ``hostname`` as SNI)."""
    try:
        transport, _ = await asyncio.get_running_loop().create_connection(
            factory, sock=sock, ssl=tls, server_hostname=hostname if tls is not None else None)
    except BaseException:
        sock.close()
        raise
    return transport


async def _open(ws: WebSocket, target: Target, proxy: Proxy | None, tls: ssl.SSLContext | None,
                user_agent: str | None) -> None:
    loop = asyncio.get_running_loop()
    hostname = target.host if tls is not None else None
    if proxy is None:
        await _connection(lambda: ws, await _tcp_connect(target.host, target.port), tls, target.host)
    elif proxy.scheme.startswith("socks"):
        await _connection(lambda: ws, await _socks_socket(proxy, target), tls, target.host)
    else:
        tunnel = _Tunnel(connect_request(proxy, target, user_agent))
        proxy_tls = default_ssl_context() if proxy.scheme == "https" else None
        transport = await _connection(lambda: tunnel, await _tcp_connect(proxy.host, proxy.port), proxy_tls,
                                      proxy.host)
        try:
            await tunnel.answered
            transport.set_protocol(ws)
            if tls is not None:
                tls_transport = await loop.start_tls(transport, ws, tls, server_hostname=hostname)
                assert tls_transport is not None
                transport = tls_transport
            ws.connection_made(transport)
        except BaseException:
            transport.abort()
            raise


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    subprotocol: str,
    proxy: str | None = None,
    max_size: int = 1024 * 1024,
    open_timeout: float = 10.0,
    close_timeout: float = 2.0,
    compression: bool = False,
    user_agent: str | None = None,
    tls: ssl.SSLContext | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[WebSocket]:
    """Open a WebSocket to ``url`` (``ws://``/``wss://``), closing it (1000) when the block ends.

    ``proxy``: a proxy URL or ``None`` (see :func:`proxy_from_environment`); ``tls``: the
    context for ``wss://`` (default: :func:`default_ssl_context`); ``compression``: offer
    permessage-deflate."""
    target = parse_url(url)
    parsed_proxy = parse_proxy(proxy) if proxy is not None else None
    context = (tls or default_ssl_context()) if target.secure else None
    extra = [(b"User-Agent", user_agent.encode())] if user_agent else []
    extra += [(k.encode(), v.encode()) for k, v in headers]
    extensions: list[Extension] = (
        [PerMessageDeflate(client_max_window_bits=12, server_max_window_bits=12)] if compression else []
    )
    request = Request(host=target.host_header, target=target.resource, subprotocols=[subprotocol],
                      extensions=extensions, extra_headers=extra)
    ws = WebSocket(request, max_size=max_size, close_timeout=close_timeout)
    try:
        async with asyncio.timeout(open_timeout):
            await _open(ws, target, parsed_proxy, context, user_agent)
            await ws.opened()
    except BaseException:
        ws.abort()
        raise
    try:
        yield ws
    finally:
        await ws.close()
