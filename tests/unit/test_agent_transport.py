"""The agent's WebSocket client (corral.agent.transport) at its I/O seam, no network.

A :class:`WebSocket` protocol object is driven directly: ``connection_made`` with a fake
transport that records what the client writes, ``data_received`` with what a server would send.
The server side is wsproto's own server connection (or hand-written bytes for what a correct
server would never send), so both ends of every exchange are checked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from websockets.proxy import get_proxy
from websockets.uri import parse_uri
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from corral.agent import transport as t

SUB = "corral.v1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self._lose()
        self.closed = True

    def abort(self) -> None:
        self._lose()
        self.aborted = True

    def _lose(self) -> None:
        if not self.is_closing() and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 10))


def client(max_size: int = 1024, **request: Any) -> tuple[t.WebSocket, FakeTransport]:
    req = Request(host="example.com", target="/device/v1/connect", subprotocols=[SUB],
                  extra_headers=[(b"User-Agent", b"corral-agent/test")], **request)
    ws = t.WebSocket(req, max_size=max_size, close_timeout=0.05)
    tr = FakeTransport()
    tr.protocol = ws
    ws.connection_made(tr)
    return ws, tr


def server_accepts(tr: FakeTransport, subprotocol: str | None = SUB) -> tuple[WSConnection, bytes]:
    """A wsproto server that reads the client's request and accepts it."""
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(tr.take())
    (request,) = list(server.events())
    assert isinstance(request, Request)
    return server, server.send(AcceptConnection(subprotocol=subprotocol))


async def opened() -> tuple[t.WebSocket, FakeTransport, WSConnection]:
    ws, tr = client()
    server, answer = server_accepts(tr)
    ws.data_received(answer)
    await ws.opened()
    return ws, tr, server


def from_client(server: WSConnection, tr: FakeTransport) -> list[Any]:
    server.receive_data(tr.take())
    return list(server.events())


def accept_key(request: bytes) -> bytes:
    key = next(line.split(b": ", 1)[1] for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key"))
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


# --- addresses and proxies --------------------------------------------------------------------


def test_urls() -> None:
    assert t.parse_url("wss://fleet.example.com/device/v1/connect") == t.Target(
        True, "fleet.example.com", 443, "/device/v1/connect")
    u = t.parse_url("ws://[::1]:8080/a?b=c")
    assert (u.host, u.port, u.resource, u.authority, u.host_header) == ("::1", 8080, "/a?b=c", "[::1]:8080",
                                                                          "[::1]:8080")
    assert t.parse_url("ws://h").host_header == "h" and t.parse_url("ws://h").resource == "/"
    assert t.parse_url("wss://h:443/").host_header == "h"
    for bad in ("http://h/", "ws://", "ws://u:p@h/", "ws://h:99999/", "wss://[::1/"):
        with pytest.raises(t.HandshakeError, match="invalid WebSocket URL"):
            t.parse_url(bad)


def test_host_names_go_out_in_ascii_an_internationalized_one_in_its_idna_form() -> None:
    ascii_url = t.parse_url("wss://Fleet.Example.com:8443/x")
    assert ascii_url.host == "fleet.example.com" and isinstance(ascii_url.host, t.AsciiHost)
    assert isinstance(ascii_url.host_header, t.AsciiHost)
    # what wsproto (Host header) and ssl (SNI) ask for: the idna codec's bytes, without the codec
    for name in ("fleet.example.com", "fleet.example.com:8443", "10.0.0.1", "[::1]:81", "h."):
        assert t.AsciiHost(name).encode("idna") == name.encode("idna")
    assert t.AsciiHost("h").encode() == b"h" and t.AsciiHost("h").encode("utf-16") == "h".encode("utf-16")
    # a non-ASCII name: converted once, by the codec
    idn = t.parse_url("wss://Bücher.example:8443/x")
    assert (idn.host, idn.host_header) == ("xn--bcher-kva.example", "xn--bcher-kva.example:8443")
    assert isinstance(idn.host, t.AsciiHost)
    assert t.parse_proxy("http://prøxy.lan:3128").host == "xn--prxy-hra.lan"
    # the codec's checks, for ASCII names too
    for bad in ("ws://a..b/", f"ws://{'a' * 64}.example/", f"ws://{'ü' * 64}.example/"):
        with pytest.raises(t.HandshakeError, match="invalid WebSocket URL"):
            t.parse_url(bad)
    with pytest.raises(t.HandshakeError, match="invalid proxy URL"):
        t.parse_proxy("http://a..b:1")


def test_the_upgrade_request_names_an_internationalized_host_in_its_idna_form() -> None:
    async def go() -> None:
        target = t.parse_url("ws://bücher.example:81/device/v1/connect")
        ws = t.WebSocket(Request(host=target.host_header, target=target.resource, subprotocols=[SUB]),
                         max_size=1024, close_timeout=0.05)
        tr = FakeTransport()
        ws.connection_made(tr)
        assert b"\r\nHost: xn--bcher-kva.example:81\r\n" in tr.written

    run(go)


def test_proxy_urls() -> None:
    assert t.parse_proxy("http://proxy.lan:3128") == t.Proxy("http", "proxy.lan", 3128)
    assert t.parse_proxy("https://proxy.lan/") == t.Proxy("https", "proxy.lan", 443)
    assert t.parse_proxy("socks5h://s") == t.Proxy("socks5h", "s", 1080)
    assert t.parse_proxy("http://me%40x:p%3Aw@p:8") == t.Proxy("http", "p", 8, "me@x", "p:w")
    for bad, why in (("ftp://p", "not supported"), ("http://", "no host"), ("http://p/x", "no path"),
                     ("http://me@p", "without a password")):
        with pytest.raises(t.HandshakeError, match=why):
            t.parse_proxy(bad)


ENVIRONMENTS: list[dict[str, str]] = [
    {},
    {"https_proxy": "http://p:3128"},
    {"HTTPS_PROXY": "http://P:1", "https_proxy": "http://p:2"},
    {"HTTPS_PROXY": "http://P:1", "https_proxy": ""},
    {"http_proxy": "http://h:1"},
    {"HTTP_PROXY": "http://h:1", "REQUEST_METHOD": "GET"},
    {"all_proxy": "socks5h://s:1080", "https_proxy": "http://p:1"},
    {"socks_proxy": "http://s:1080"},
    {"wss_proxy": "http://w:1", "https_proxy": "http://p:1"},
    {"https_proxy": "http://p:1", "no_proxy": "*"},
    {"https_proxy": "http://p:1", "no_proxy": "example.com"},
    {"https_proxy": "http://p:1", "NO_PROXY": ".Example.COM, other"},
    {"https_proxy": "http://p:1", "no_proxy": "fleet.example.com:443"},
    {"https_proxy": "http://p:1", "no_proxy": "fleet.example.com:8443"},
    {"https_proxy": "http://p:1", "no_proxy": "ample.com,,"},
    {"http_proxy": "http://h:1", "no_proxy": "localhost"},
]


@pytest.mark.parametrize("env", ENVIRONMENTS)
@pytest.mark.parametrize("url", ["wss://fleet.example.com/device/v1/connect", "ws://fleet.example.com:8080/x",
                                 "ws://localhost/", "wss://[::1]:8443/"])
def test_the_proxy_from_the_environment_is_the_one_websockets_chose(
        env: dict[str, str], url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent used ``websockets.proxy.get_proxy`` (urllib's rules); this is the same choice
    without importing urllib.request."""
    import os

    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert t.proxy_from_environment(url) == get_proxy(parse_uri(url))
    assert t.proxy_from_environment(url, env) == get_proxy(parse_uri(url))


def test_connect_request_and_the_proxy_answer() -> None:
    target = t.parse_url("wss://fleet.example.com/device/v1/connect")
    req = t.connect_request(t.Proxy("http", "p", 1, "me", "pw"), target, "corral-agent/1")
    assert req == (b"CONNECT fleet.example.com:443 HTTP/1.1\r\nHost: fleet.example.com\r\n"
                   b"User-Agent: corral-agent/1\r\nProxy-Authorization: Basic bWU6cHc=\r\n\r\n")
    assert t.connect_request(t.Proxy("http", "p", 1), t.parse_url("ws://[::1]:81/"), None) == (
        b"CONNECT [::1]:81 HTTP/1.1\r\nHost: [::1]:81\r\n\r\n")
    assert t.proxy_status(b"HTTP/1.1 200 Connection established\r\nVia: x") == 200
    assert t.proxy_status(b"HTTP/1.0 407 Proxy Authentication Required") == 407
    for bad in (b"SSH-2.0-OpenSSH", b"HTTP/1.1 20 x", b"", b"HTTP/2 200"):
        with pytest.raises(t.HandshakeError, match="did not answer with HTTP"):
            t.proxy_status(bad)


# --- the opening handshake --------------------------------------------------------------------


def test_the_upgrade_request_and_an_accepting_server() -> None:
    async def go() -> None:
        ws, tr = client()
        request = bytes(tr.written)
        assert request.startswith(b"GET /device/v1/connect HTTP/1.1\r\n")
        for header in (b"host: example.com", b"upgrade: websocket", b"sec-websocket-version: 13",
                       b"sec-websocket-protocol: corral.v1", b"user-agent: corral-agent/test"):
            assert header in request.lower()
        assert b"sec-websocket-extensions" not in request.lower()
        server, answer = server_accepts(tr)
        # the server's first frame in the same segment as its 101
        ws.data_received(answer + server.send(BytesMessage(data=b"challenge")))
        await ws.opened()
        assert ws.subprotocol == SUB
        assert await ws.recv() == b"challenge"

    run(go)


def test_compression_is_offered_only_when_asked() -> None:
    async def go() -> None:
        from wsproto.extensions import PerMessageDeflate

        _, tr = client(extensions=[PerMessageDeflate(client_max_window_bits=12, server_max_window_bits=12)])
        assert b"sec-websocket-extensions: permessage-deflate" in tr.written.lower()

    run(go)


@pytest.mark.parametrize("answer, error, match", [
    (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n", t.InvalidStatus, "HTTP 403"),
    (b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 5\r\n\r\noops!", t.InvalidStatus, "HTTP 502"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Accept: AAAA\r\nSec-WebSocket-Protocol: corral.v1\r\n\r\n", t.HandshakeError,
     "Bad accept token"),
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n", t.HandshakeError, "Upgrade: websocket"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", t.HandshakeError, "invalid upgrade response"),
])
def test_a_refusing_or_broken_server(answer: bytes, error: type[Exception], match: str) -> None:
    async def go() -> None:
        ws, tr = client()
        ws.data_received(answer)
        with pytest.raises(error, match=match) as info:
            await ws.opened()
        if isinstance(info.value, t.InvalidStatus):
            assert info.value.status_code == int(answer.split()[1])
        assert tr.aborted

    run(go)


@pytest.mark.parametrize("chosen, match", [(None, "accepted no subprotocol, not corral.v1"),
                                           ("corral.v2", "unrecognized subprotocol corral.v2")])
def test_the_server_must_select_our_subprotocol(chosen: str | None, match: str) -> None:
    async def go() -> None:
        ws, tr = client()
        key = accept_key(bytes(tr.written))
        answer = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + key + b"\r\n")
        if chosen:
            answer += b"Sec-WebSocket-Protocol: " + chosen.encode() + b"\r\n"
        ws.data_received(answer + b"\r\n")
        with pytest.raises(t.HandshakeError, match=match):
            await ws.opened()
        assert tr.aborted

    run(go)


def test_the_server_hanging_up_during_the_handshake() -> None:
    async def go() -> None:
        ws, tr = client()
        ws.data_received(b"HTTP/1.1 101 Switching")
        tr.close()
        with pytest.raises(t.HandshakeError, match="closed during the opening handshake"):
            await ws.opened()

    run(go)


# --- messages -----------------------------------------------------------------------------------


def test_binary_text_and_fragmented_messages_and_pings() -> None:
    async def go() -> None:
        ws, tr, server = await opened()
        await ws.send(b"\x00hello")
        (msg,) = from_client(server, tr)
        assert isinstance(msg, BytesMessage) and msg.data == b"\x00hello"
        ws.data_received(server.send(BytesMessage(data=b"part1-", message_finished=False))
                         + server.send(Ping(payload=b"p"))
                         + server.send(BytesMessage(data=b"part2")) + server.send(TextMessage(data="text")))
        assert await ws.recv() == b"part1-part2"
        assert await ws.recv() == "text"
        (pong,) = from_client(server, tr)
        assert isinstance(pong, Pong) and pong.payload == b"p"

    run(go)


def test_a_message_over_max_size_fails_the_connection_with_1009() -> None:
    async def go() -> None:
        ws, tr, server = await opened()
        ws.data_received(server.send(BytesMessage(data=b"x" * 1024)))  # max_size exactly: fine
        assert await ws.recv() == b"x" * 1024
        # fragments count together: 600 + 600 > 1024
        ws.data_received(server.send(BytesMessage(data=b"y" * 600, message_finished=False)))
        ws.data_received(server.send(BytesMessage(data=b"y" * 600)))
        with pytest.raises(t.ConnectionClosed) as info:
            await ws.recv()
        assert (info.value.sent, info.value.code) == (1009, None)
        assert info.value.failure == "message over 1024 bytes"
        (close,) = from_client(server, tr)
        assert isinstance(close, CloseConnection) and close.code == 1009
        with pytest.raises(t.ConnectionClosed):
            await ws.send(b"late")
        # the server answers the close; the connection ends
        ws.data_received(server.send(close.response()))
        await ws.close()
        assert ws.close_code == 1009 and tr.closed

    run(go)


def test_a_frame_that_cannot_be_parsed_fails_the_connection() -> None:
    async def go() -> None:
        ws, tr, server = await opened()
        ws.data_received(b"\x83\x00")  # opcode 3 is reserved
        with pytest.raises(t.ConnectionClosed) as info:
            await ws.recv()
        assert info.value.sent == 1002 and info.value.failure
        (close,) = from_client(server, tr)
        assert isinstance(close, CloseConnection) and close.code == 1002
        await ws.close()  # the server never answers: given up after close_timeout
        assert tr.aborted

    run(go)


def test_the_server_closing_is_answered_and_reported() -> None:
    async def go() -> None:
        ws, tr, server = await opened()
        ws.data_received(server.send(BytesMessage(data=b"last")) + server.send(CloseConnection(4403, "refused")))
        assert await ws.recv() == b"last"  # what came before the close is delivered
        with pytest.raises(t.ConnectionClosed) as info:
            await ws.recv()
        assert (info.value.code, info.value.reason, info.value.sent, info.value.failure) == (4403, "refused", None,
                                                                                              None)
        (echo,) = from_client(server, tr)
        assert isinstance(echo, CloseConnection) and echo.code == 4403
        assert tr.closed
        with pytest.raises(t.ConnectionClosed):
            await ws.send(b"x")

    run(go)


def test_a_lost_connection_has_no_close_code() -> None:
    async def go() -> None:
        ws, tr, _ = await opened()
        waiting = asyncio.create_task(ws.recv())
        await asyncio.sleep(0)
        tr.abort()
        with pytest.raises(t.ConnectionClosed) as info:
            await waiting
        assert info.value.code is None and str(info.value) == "no close frame received"

    run(go)


def test_closing_sends_the_code_and_waits_for_the_server() -> None:
    async def go() -> None:
        ws, tr, server = await opened()
        closing = asyncio.create_task(ws.close(1001, "agent stopping"))
        await asyncio.sleep(0)
        (close,) = from_client(server, tr)
        assert isinstance(close, CloseConnection) and (close.code, close.reason) == (1001, "agent stopping")
        assert not closing.done()
        ws.data_received(server.send(close.response()))
        await closing
        assert tr.closed and not tr.aborted and ws.close_code == 1001
        await ws.close()  # again: nothing more to do
        assert tr.take() == b""

    run(go)


def test_a_receiver_sees_a_close_from_another_task() -> None:
    """The reboot command closes the socket while the receive loop waits in recv."""

    async def go() -> None:
        ws, tr, _ = await opened()
        receiving = asyncio.create_task(ws.recv())
        await asyncio.sleep(0)
        await ws.close(1001, "rebooting")  # no answer: given up after close_timeout
        with pytest.raises(t.ConnectionClosed) as info:
            await receiving
        assert info.value.sent == 1001 and tr.aborted

    run(go)


def test_writes_wait_while_the_socket_is_full() -> None:
    async def go() -> None:
        ws, tr, server = await opened()
        ws.pause_writing()
        sending = asyncio.create_task(ws.send(b"a"))
        await asyncio.sleep(0)
        assert not sending.done()
        ws.resume_writing()
        await sending
        ws.pause_writing()
        blocked = asyncio.create_task(ws.send(b"b"))
        await asyncio.sleep(0)
        tr.abort()  # the connection ends while waiting
        with pytest.raises(t.ConnectionClosed):
            await blocked
        assert [m.data for m in from_client(server, tr) if isinstance(m, Message)] == [b"a", b"b"]

    run(go)


def test_unread_messages_stop_the_reading() -> None:
    async def go() -> None:
        ws, tr, server = await opened()
        ws.data_received(b"".join(server.send(BytesMessage(data=bytes([i]))) for i in range(t.MAX_QUEUE)))
        assert not tr.reading
        got = [await ws.recv() for _ in range(t.MAX_QUEUE // 2 + 1)]
        assert got == [bytes([i]) for i in range(len(got))] and tr.reading

    run(go)


def test_a_rejecting_server_through_wsproto() -> None:
    """The same refusal from a real (wsproto) server: status and body."""

    async def go() -> None:
        ws, tr = client()
        server = WSConnection(ConnectionType.SERVER)
        server.receive_data(tr.take())
        list(server.events())
        ws.data_received(server.send(RejectConnection(status_code=401, has_body=False)))
        with pytest.raises(t.InvalidStatus, match="HTTP 401"):
            await ws.opened()

    run(go)
