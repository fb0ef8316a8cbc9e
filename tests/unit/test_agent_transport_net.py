"""The agent's WebSocket client on real sockets: TLS, HTTP(S) proxies, and servers that refuse
or misbehave, each ending in the same outcome (and message) the agent had with ``websockets``."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import serve

from corral import protocol
from corral.agent import transport
from corral.agent.config import AgentConfig
from corral.agent.connection import Agent, CloseAction
from corral.agent.identity import Identity
from corral.agent.platform.sim import SimPlatform
from tests.netfixtures import ConnectProxy, make_tls
from tests.unit.test_agent_connection import GUARD, FakeHub, Running, agent_config


@pytest.fixture
def trusted_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """A test CA the agent's default TLS context trusts (through SSL_CERT_FILE, as an operator
    would point it at a private CA)."""
    server_ctx, client_ctx, ca = make_tls(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    transport.default_ssl_context.cache_clear()
    yield server_ctx, client_ctx
    transport.default_ssl_context.cache_clear()


def test_the_agent_over_tls_directly_and_through_http_and_https_proxies(
        tmp_path: Path, trusted_ca: tuple[Any, Any]) -> None:
    server_ctx, _ = trusted_ca

    async def scenario() -> None:
        async with FakeHub(tls=server_ctx) as hub, ConnectProxy() as http, ConnectProxy(tls=server_ctx) as https:
            port = hub.url.rsplit(":", 1)[1]
            for n, proxy in enumerate(("none", http.url, https.url), start=1):
                async with Running(agent_config(hub, tmp_path / str(n), proxy=proxy, enroll_token="good-token")):
                    _, conn, _, _ = await hub.next("hello")
                    await hub.next("inventory")
                    await hub.send(conn, protocol.Command(name="ping"), id="p")
                    _, _, _, res = await hub.next("command_result")
                    assert res.ok
            for p in (http, https):
                assert len(p.requests) == 1
                assert p.requests[0].startswith(f"CONNECT localhost:{port} HTTP/1.1\r\n".encode())
                assert b"User-Agent: corral-agent/" in p.requests[0]

    asyncio.run(scenario())


ROOT = Path(__file__).resolve().parents[2]
IDNA_MODULES = ("encodings.idna", "stringprep", "unicodedata")

CONNECT_AND_LIST_IDNA_MODULES = f"""
import asyncio, sys
from corral.agent import transport

async def main():
    for proxy in sys.argv[2:]:
        async with transport.connect(sys.argv[1], subprotocol="corral.v1", proxy=proxy or None):
            pass

asyncio.run(main())
print(" ".join(m for m in {IDNA_MODULES!r} if m in sys.modules))
"""


def test_an_ascii_host_name_is_resolved_and_named_without_the_idna_codec(trusted_ca: tuple[Any, Any]) -> None:
    """The idna codec imports stringprep and unicodedata (~0.4 MB, ADR 0007): a process that
    opens wss:// connections to ``localhost`` (resolved, SNI, Host header), directly and through
    an HTTPS proxy (resolved, SNI, CONNECT), does not load them."""
    server_ctx, _ = trusted_ca

    async def scenario() -> str:
        async with FakeHub(tls=server_ctx) as hub, ConnectProxy(tls=server_ctx) as https:
            url = hub.url.replace("https://", "wss://") + "/device/v1/connect"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CONNECT_AND_LIST_IDNA_MODULES, url, "", https.url,
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), GUARD)
            assert proc.returncode == 0, err.decode()
            assert len(https.requests) == 1
            return out.decode().strip()

    assert asyncio.run(scenario()) == ""


def test_every_address_of_a_name_is_tried_and_a_refusal_is_an_oserror() -> None:
    async def go() -> None:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            port = listening.getsockname()[1]
            # localhost: ::1 (refused: nothing listens there) and/or 127.0.0.1, in the resolver's order
            sock = await transport._tcp_connect(transport.AsciiHost("localhost"), port)
            assert sock.getpeername()[:2] == ("127.0.0.1", port)
            sock.close()
        with pytest.raises(OSError):
            await transport._tcp_connect(transport.AsciiHost("127.0.0.1"), port)

    asyncio.run(go())


def config_for(url: str, state_dir: Path) -> AgentConfig:
    hub = FakeHub()
    hub.url = url
    return agent_config(hub, state_dir)


def test_a_proxy_that_refuses(tmp_path: Path) -> None:
    async def go() -> tuple[CloseAction, str]:
        async with FakeHub() as hub, ConnectProxy(refuse=407) as proxy:
            agent = Agent(agent_config(hub, tmp_path, proxy=proxy.url), Identity.generate(), SimPlatform(0))
            return await asyncio.wait_for(agent._connect_once(), GUARD)

    action, why = asyncio.run(go())
    assert action is CloseAction.RECONNECT
    assert why.startswith("cannot connect to ws://127.0.0.1:") and why.endswith("proxy rejected connection: HTTP 407")


def test_an_untrusted_certificate(tmp_path: Path) -> None:
    server_ctx, _, _ = make_tls(tmp_path)  # not trusted by the agent's default context

    async def go() -> tuple[CloseAction, str]:
        async with FakeHub(tls=server_ctx) as hub:
            agent = Agent(agent_config(hub, tmp_path / "s"), Identity.generate(), SimPlatform(0))
            return await asyncio.wait_for(agent._connect_once(), GUARD)

    action, why = asyncio.run(go())
    assert action is CloseAction.RECONNECT and "CERTIFICATE_VERIFY_FAILED" in why


async def _http_server(answer: bytes) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("answer, why", [
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "answered HTTP 403"),
    (b"HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\nbusy", "answered HTTP 503"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
     "invalid upgrade response: Bad accept token"),
    (b"", "connection closed during the opening handshake"),
])
def test_a_server_that_does_not_upgrade(tmp_path: Path, answer: bytes, why: str) -> None:
    async def go() -> tuple[CloseAction, str]:
        server, url = await _http_server(answer)
        async with server:
            agent = Agent(config_for(url, tmp_path), Identity.generate(), SimPlatform(0))
            return await asyncio.wait_for(agent._connect_once(), GUARD)

    action, message = asyncio.run(go())
    assert action is CloseAction.RECONNECT and message.endswith(why), message


def test_a_server_without_our_subprotocol(tmp_path: Path) -> None:
    async def go() -> tuple[CloseAction, str]:
        async def handler(ws: Any) -> None:
            await ws.wait_closed()

        async with serve(handler, "127.0.0.1", 0, select_subprotocol=lambda conn, offered: None) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            agent = Agent(config_for(f"http://127.0.0.1:{port}", tmp_path), Identity.generate(), SimPlatform(0))
            return await asyncio.wait_for(agent._connect_once(), GUARD)

    action, why = asyncio.run(go())
    assert action is CloseAction.RECONNECT
    assert why.endswith("the server accepted no subprotocol, not corral.v1"), why


def test_a_frame_over_max_frame_bytes_from_the_server(tmp_path: Path) -> None:
    """The agent fails the connection with 1009 and reconnects; nothing of the frame is kept."""

    async def scenario() -> None:
        async with FakeHub() as hub, Running(agent_config(hub, tmp_path, max_frame_bytes=4096)):
            _, first, _, _ = await hub.next("hello")
            await hub.next("inventory")
            await hub.sockets[first].send(b"\x00" * 4097)
            assert await hub.next("closed") == (pytest.approx(0, abs=1e9), first, None, protocol.CloseCode.TOO_BIG)
            _, second, _, _ = await hub.next("hello")
            assert second == first + 1

    asyncio.run(scenario())


def test_on_uvloop_as_the_simulator_runs(tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with FakeHub() as hub, ConnectProxy() as proxy, \
                Running(agent_config(hub, tmp_path, proxy=proxy.url, enroll_token="good-token")):
            _, conn, _, _ = await hub.next("hello")
            await hub.next("inventory")
            await hub.send(conn, protocol.Command(name="ping"), id="p")
            _, _, _, res = await hub.next("command_result")
            assert res.ok

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
