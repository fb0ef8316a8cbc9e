"""The agent's connection loop against a small fake hub on loopback.

The fake speaks the real handshake (challenge, Ed25519-verified hello, welcome) with real
WebSockets; each test scripts how it behaves per connection. Waits are bounded by a generous
guard (a hang fails the test) but nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import msgspec
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import corral
from corral import protocol
from corral.agent.commands import CommandHost, builtin_commands
from corral.agent.config import AgentConfig, config_from_dict
from corral.agent.connection import Agent, CloseAction, build_hello, close_action, connect_target
from corral.agent.identity import Identity
from corral.agent.main import run_agent
from corral.agent.platform.sim import SimPlatform

GUARD = 15.0  # seconds before a stuck test gives up (not a timing assertion)

#: decides, per connection number and hello, to welcome (None) or close with a code
Policy = Callable[[int, protocol.Hello], int | None]


class FakeHub:
    """A minimal Corral hub. Records every frame devices send, per type, in arrival order."""

    def __init__(
        self,
        *,
        tokens: tuple[str, ...] = ("good-token",),
        heartbeat_interval: float = 0.2,
        policy: Policy | None = None,
        silent: set[int] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.codec = protocol.Codec()
        self.tls = tls
        self.tokens = set(tokens)
        self.status: dict[str, protocol.AdmissionStatus] = {}
        self.heartbeat_interval = heartbeat_interval
        self.policy = policy
        self.silent = silent or set()  # connections the hub never sends anything after welcome
        self.connections = 0
        self.welcomed = 0
        self.hellos: list[protocol.Hello] = []
        self.hello_by_conn: dict[int, protocol.Hello] = {}
        self.close_codes: dict[int, int | None] = {}
        self.sockets: dict[int, ServerConnection] = {}
        self.queues: defaultdict[str, asyncio.Queue[tuple[int, int, protocol.Envelope | None, Any]]] = defaultdict(
            asyncio.Queue
        )
        self._order = itertools.count()
        self._server: Server | None = None
        self.url = ""

    async def __aenter__(self) -> FakeHub:
        self._server = await serve(
            self.handler,
            "127.0.0.1",
            0,
            subprotocols=[protocol.PROTOCOL],  # type: ignore[list-item]
            ssl=self.tls,
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"https://localhost:{port}" if self.tls else f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _record(self, kind: str, conn: int, env: protocol.Envelope | None, body: Any) -> None:
        self.queues[kind].put_nowait((next(self._order), conn, env, body))

    async def next(self, kind: str) -> tuple[int, int, protocol.Envelope | None, Any]:
        """(arrival order, connection number, envelope, body) of the next frame of a type."""
        return await asyncio.wait_for(self.queues[kind].get(), GUARD)

    async def send(self, conn: int, body: msgspec.Struct, id: str | None = None) -> None:
        await self.sockets[conn].send(self.codec.encode(body, id=id))

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        n = self.connections
        try:
            assert ws.request is not None and ws.request.path == "/device/v1/connect"
            assert ws.subprotocol == protocol.PROTOCOL
            nonce = os.urandom(protocol.NONCE_BYTES)
            await ws.send(self.codec.encode(protocol.Challenge(nonce=nonce, server_time=time.time())))
            _, hello = self.codec.expect(await ws.recv(), protocol.Hello)
            try:
                assert hello.device_id == protocol.device_id_for(hello.public_key)
                Ed25519PublicKey.from_public_bytes(hello.public_key).verify(
                    hello.signature, protocol.hello_signing_payload(nonce, hello.device_id, hello.public_key)
                )
            except (InvalidSignature, AssertionError):
                await ws.close(protocol.CloseCode.AUTH_FAILED, "bad signature")
                return
            self.hellos.append(hello)
            self.hello_by_conn[n] = hello
            self._record("hello", n, None, hello)
            decision = self.policy(n, hello) if self.policy else None
            if decision is not None:
                await ws.close(decision, "policy")
                return
            if hello.enroll_token is not None and hello.enroll_token not in self.tokens:
                await ws.close(protocol.CloseCode.AUTH_FAILED, "unknown enrollment token")
                return
            if hello.enroll_token in self.tokens:
                self.status[hello.device_id] = "accepted"
            status = self.status.setdefault(hello.device_id, "pending")
            self.sockets[n] = ws
            await ws.send(
                self.codec.encode(
                    protocol.Welcome(
                        device_id=hello.device_id,
                        status=status,
                        heartbeat_interval=self.heartbeat_interval,
                        session_id=f"s{n}",
                    )
                )
            )
            self.welcomed += 1
            async for frame in ws:
                env, body = self.codec.decode(frame)
                self._record(env.type, n, env, body)
                if isinstance(body, protocol.Heartbeat) and n not in self.silent:
                    await ws.send(self.codec.encode(protocol.HeartbeatAck(seq=body.seq, server_time=time.time())))
        except ConnectionClosed:
            pass
        finally:
            self.close_codes[n] = ws.close_code
            self._record("closed", n, None, ws.close_code)


def agent_config(hub: FakeHub, state_dir: Path, **extra: Any) -> AgentConfig:
    return config_from_dict(
        {
            "server": hub.url,
            "state_dir": str(state_dir),
            "connect_timeout": 5.0,
            "proxy": "none",  # loopback, whatever the environment says
            "close_timeout": 2.0,
            "backoff": {"base": 0.01, "cap": 0.05, "reset_after": 60.0},
            **extra,
        }
    )


class Running:
    """run_agent() in a task, stopped (and awaited) on exit."""

    def __init__(self, config: AgentConfig, platform: SimPlatform | None = None) -> None:
        self.stop = asyncio.Event()
        self.platform = platform or SimPlatform(7, boot_delay=(0.0, 0.0))
        self.task = asyncio.create_task(run_agent(config, self.platform, self.stop))

    async def __aenter__(self) -> Running:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, GUARD)

    async def result(self) -> int:
        self.stop.set()
        return await asyncio.wait_for(self.task, GUARD)


def read_state(state_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state_dir / "state.json").read_text())
    return data


# --- pure decisions ---------------------------------------------------------------------------


def test_close_actions() -> None:
    assert close_action(4403)[0] is CloseAction.STOP
    assert "rejected or decommissioned" in close_action(4403)[1]
    for code in (None, 1000, 1001, 1006, 1009, 4000, 4400, 4401, 4408, 4409, 4429, 4999):
        assert close_action(code)[0] is CloseAction.RECONNECT, code
    assert "enrollment token" in close_action(4401)[1]
    assert "replaced" in close_action(4409)[1]


def test_connect_target_resolves_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://proxy.lan:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    connect_target.cache_clear()
    try:
        url = "wss://fleet.example.com/device/v1/connect"
        assert connect_target("https://fleet.example.com", "auto") == (url, "http://proxy.lan:3128")
        assert connect_target("https://fleet.example.com", "none") == (url, None)
        assert connect_target("https://fleet.example.com", "socks5h://s:1080") == (url, "socks5h://s:1080")
    finally:
        connect_target.cache_clear()


def test_hello_proves_possession_of_the_key() -> None:
    ident = Identity.generate()
    nonce = os.urandom(32)
    hello = build_hello(ident, protocol.Challenge(nonce=nonce, server_time=0.0), "tok")
    assert (hello.device_id, hello.public_key, hello.enroll_token) == (
        ident.device_id,
        ident.public_key_raw,
        "tok",
    )
    assert hello.agent_version == corral.__version__
    key = Ed25519PublicKey.from_public_bytes(hello.public_key)
    key.verify(hello.signature, protocol.hello_signing_payload(nonce, ident.device_id, ident.public_key_raw))
    with pytest.raises(InvalidSignature):  # bound to the nonce: no replay
        key.verify(hello.signature, protocol.hello_signing_payload(b"x" * 32, ident.device_id, ident.public_key_raw))
    assert build_hello(ident, protocol.Challenge(nonce=nonce, server_time=0.0), None).enroll_token is None


# --- against the fake hub ---------------------------------------------------------------------


def test_enroll_inventory_heartbeat_and_commands(tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def scenario() -> None:
        async with FakeHub() as hub:
            cfg = agent_config(hub, state, enroll_token="good-token", attributes={"site": "lab"})
            async with Running(cfg) as agent:
                _, conn, _, hello = await hub.next("hello")
                assert hello.enroll_token == "good-token"
                assert hello.agent_version == corral.__version__

                _, _, _, inv = await hub.next("inventory")
                assert inv.hostname == "sim-0007"
                assert inv.attributes == {"simulated": True, "site": "lab"}
                seqs = [(await hub.next("heartbeat"))[3].seq for _ in range(2)]
                assert seqs == [1, 2]

                await hub.send(conn, protocol.Command(name="ping"), id="c1")
                ack_at, _, ack_env, _ = await hub.next("command_ack")
                res_at, _, res_env, res = await hub.next("command_result")
                assert ack_env is not None and ack_env.id == "c1"
                assert res_env is not None and res_env.id == "c1"
                assert ack_at < res_at  # acknowledged first, then answered
                assert res.ok is True and res.result["pong"] is True and res.result["time"] > 0

                await hub.send(conn, protocol.Command(name="refresh-inventory"), id="c2")
                await hub.next("command_ack")
                inv_at, _, _, _ = await hub.next("inventory")
                res_at, _, _, res = await hub.next("command_result")
                assert (res.ok, res.result) == (True, {})
                assert inv_at < res_at

                await hub.send(conn, protocol.Command(name="self-destruct"), id="c3")
                await hub.next("command_ack")
                _, _, env, res = await hub.next("command_result")
                assert env is not None and env.id == "c3"
                assert (res.ok, res.error) == (False, "unknown command self-destruct")
                assert await agent.result() == 0

            _, _, _, code = await hub.next("closed")
            assert code == protocol.CloseCode.GOING_AWAY  # a clean goodbye on stop

            assert read_state(state)["enrolled"] is True
            assert read_state(state)["status"] == "accepted"
            first_id = hello.device_id

            # a restart: same identity, and an enrolled device no longer presents its token
            async with Running(cfg):
                _, _, _, hello = await hub.next("hello")
                assert hello.device_id == first_id
                assert hello.enroll_token is None
                await hub.next("inventory")

    asyncio.run(scenario())
    assert oct(os.stat(state).st_mode & 0o777) == "0o700"
    assert oct(os.stat(state / "device.key").st_mode & 0o777) == "0o600"


def test_pending_device_is_accepted_while_connected(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeHub() as hub, Running(agent_config(hub, tmp_path)):
            _, conn, _, hello = await hub.next("hello")
            assert hello.enroll_token is None
            await hub.next("inventory")  # pending devices report too
            assert read_state(tmp_path)["status"] == "pending"
            await hub.send(conn, protocol.Status(status="accepted"))
            await hub.send(conn, protocol.Command(name="ping"), id="sync")
            await hub.next("command_result")  # the status frame was handled before this
            assert read_state(tmp_path) == {
                "device_id": hello.device_id,
                "enrolled": True,
                "status": "accepted",
            }

    asyncio.run(scenario())


def test_refused_device_stops_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> int:
        async with FakeHub(policy=lambda n, hello: protocol.CloseCode.REFUSED) as hub:
            code = await asyncio.wait_for(run_agent(agent_config(hub, tmp_path), SimPlatform(1)), GUARD)
            assert hub.connections == 1  # no retry after a permanent refusal
            return code

    assert asyncio.run(scenario()) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: device ") and "refused" in err


def test_reconnects_after_the_server_closes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeHub() as hub, Running(agent_config(hub, tmp_path, enroll_token="good-token")):
            _, first, _, hello1 = await hub.next("hello")
            await hub.next("inventory")
            await hub.sockets[first].close(protocol.CloseCode.SERVER_SHUTDOWN, "restarting")
            _, second, _, hello2 = await hub.next("hello")
            assert second == first + 1
            assert hello2.device_id == hello1.device_id
            _, conn, _, _ = await hub.next("inventory")
            assert conn == second

    asyncio.run(scenario())


def test_an_auth_failure_after_enrollment_presents_the_token_again(tmp_path: Path) -> None:
    """A server that lost its database rejects the known-device hello; the token gets us back."""

    async def scenario() -> None:
        async with FakeHub() as hub:
            cfg = agent_config(hub, tmp_path, enroll_token="good-token")
            async with Running(cfg):
                assert (await hub.next("hello"))[3].enroll_token == "good-token"
                await hub.next("inventory")
            assert read_state(tmp_path)["enrolled"] is True
            hub.status.clear()
            hub.policy = lambda n, hello: protocol.CloseCode.AUTH_FAILED if not hello.enroll_token else None
            async with Running(cfg):
                tokens = [(await hub.next("hello"))[3].enroll_token for _ in range(2)]
                assert tokens == [None, "good-token"]
                _, conn, _, _ = await hub.next("inventory")
                assert conn == 3

    asyncio.run(scenario())


def test_an_enrolled_device_the_server_forgot_enrolls_again_with_its_token(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeHub() as hub:
            cfg = agent_config(hub, tmp_path, enroll_token="good-token")
            async with Running(cfg):
                await hub.next("hello")
                await hub.next("inventory")
            hub.status.clear()  # a server with a new database: the key is unknown, so "pending"
            async with Running(cfg):
                tokens = [(await hub.next("hello"))[3].enroll_token for _ in range(2)]
                assert tokens == [None, "good-token"]
                _, conn, _, _ = await hub.next("inventory")
                assert conn == 3  # reported on the accepted connection only
                await hub.send(conn, protocol.Command(name="ping"), id="sync")
                await hub.next("command_result")
            assert read_state(tmp_path)["status"] == "accepted"

    asyncio.run(scenario())


def test_a_silent_server_is_dropped_and_reconnected(tmp_path: Path) -> None:
    async def scenario() -> None:
        # connection 1 never answers a heartbeat, nor sends anything else
        async with FakeHub(silent={1}, heartbeat_interval=0.05) as hub, Running(agent_config(hub, tmp_path)):
            _, first, _, _ = await hub.next("hello")
            _, second, _, _ = await hub.next("hello")
            assert (first, second) == (1, 2)
            assert await hub.next("closed") == (ANY, 1, None, protocol.CloseCode.TIMEOUT)

    asyncio.run(scenario())


def test_a_malformed_frame_closes_and_reconnects(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeHub() as hub, Running(agent_config(hub, tmp_path)):
            _, first, _, _ = await hub.next("hello")
            await hub.next("inventory")
            await hub.sockets[first].send(b"\xc1 not msgpack")
            _, second, _, _ = await hub.next("hello")
            assert second == 2
            assert await hub.next("closed") == (ANY, 1, None, protocol.CloseCode.MALFORMED)

    asyncio.run(scenario())


def test_unknown_message_types_are_ignored(tmp_path: Path) -> None:
    """A newer server may send types this agent does not know: not a reason to disconnect."""

    async def scenario() -> None:
        async with FakeHub() as hub, Running(agent_config(hub, tmp_path)):
            _, conn, _, _ = await hub.next("hello")
            await hub.next("inventory")
            env = protocol.Envelope(type="rule_push", body=msgspec.Raw(msgspec.msgpack.encode({"x": 1})))
            await hub.sockets[conn].send(msgspec.msgpack.encode(env))
            await hub.send(conn, protocol.Command(name="ping"), id="after")
            _, conn2, _, _ = await hub.next("command_result")
            assert conn2 == conn and hub.connections == 1

    asyncio.run(scenario())


def test_reboot_command_closes_reboots_and_comes_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeHub() as hub:
            platform = SimPlatform(3, boot_delay=(0.0, 0.0))
            async with Running(agent_config(hub, tmp_path), platform):
                _, first, _, _ = await hub.next("hello")
                _, _, _, inv1 = await hub.next("inventory")
                await hub.send(first, protocol.Command(name="reboot"), id="r1")
                await hub.next("command_ack")
                _, _, env, res = await hub.next("command_result")
                assert env is not None and env.id == "r1"
                assert (res.ok, res.result) == (True, {"rebooting": True})
                _, closed, _, code = await hub.next("closed")
                assert (closed, code) == (first, protocol.CloseCode.GOING_AWAY)
                _, second, _, _ = await hub.next("hello")
                _, _, _, inv2 = await hub.next("inventory")
                assert second == first + 1
                assert platform.reboots == 1
                assert inv2.boot_time > inv1.boot_time

    asyncio.run(scenario())


def test_unusable_state_dir_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a dir")
    cfg = config_from_dict({"server": "http://127.0.0.1:9", "state_dir": str(tmp_path / "file" / "state")})
    assert asyncio.run(run_agent(cfg, SimPlatform(0))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: state dir ") and err.count("\n") == 1


def test_an_agent_with_its_own_commands_and_no_state_store(tmp_path: Path) -> None:
    """Agent can be embedded: extra commands, an in-memory identity, no state on disk."""
    registry = builtin_commands()

    @registry.command("odd")
    async def odd(host: CommandHost, args: dict[str, Any]) -> object:
        return object()  # not something msgpack can carry

    async def scenario() -> None:
        async with FakeHub() as hub:
            agent = Agent(
                agent_config(hub, tmp_path / "unused"),
                Identity.generate(),
                SimPlatform(5),
                commands=registry,
                enroll_token="good-token",
            )
            task = asyncio.create_task(agent.run())
            try:
                _, conn, _, hello = await hub.next("hello")
                assert hello.enroll_token == "good-token"
                await hub.next("inventory")
                assert agent.connected and agent.status == "accepted"
                await hub.send(conn, protocol.Command(name="odd"), id="o1")
                _, _, env, res = await hub.next("command_result")
                assert env is not None and env.id == "o1"
                assert res.ok is False and res.error.startswith("result cannot be encoded")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            assert not agent.connected
            _, _, _, code = await hub.next("closed")
            assert code == protocol.CloseCode.GOING_AWAY

    asyncio.run(scenario())
    assert not (tmp_path / "unused").exists()
