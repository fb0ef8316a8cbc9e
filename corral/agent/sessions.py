"""The agent's side of a remote-access session: from ``session_open`` to the session's end (ADR 0016).

The server asks on the control connection (``session_open``); the agent decides, against its own
``[remote]`` config, whether it runs the session at all (a feature turned off, a limit reached:
it answers ``session_refused`` with the reason), then opens a WebSocket of its own to the relay
URL with the session's token, and runs the session kind over it
(:mod:`corral.agent.remote`). One socket per session: a busy terminal or a large copy never
holds up the control connection's heartbeats, telemetry or other sessions, and the socket's
own flow control is the session's backpressure.

Imported when the first ``session_open`` arrives (ADR 0007: the idle agent loads none of it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from corral import protocol
from corral.agent import transport
from corral.agent.config import AgentConfig

log = logging.getLogger("corral.agent.sessions")

SESSION_SUBPROTOCOL = "corral.session.v1"
Refuse = Callable[[str], Awaitable[None]]


class TransportChannel:
    """A :class:`corral.agent.remote.channel.Channel` over the agent's WebSocket client."""

    def __init__(self, ws: transport.WebSocket) -> None:
        self.ws = ws

    async def recv(self) -> bytes | str:
        from corral.agent.remote.channel import ChannelClosed

        try:
            return await self.ws.recv()
        except transport.ConnectionClosed as e:
            raise ChannelClosed(str(e)) from None

    async def send(self, data: bytes | str) -> None:
        from corral.agent.remote.channel import ChannelClosed

        try:
            await self.ws.send(data)
        except transport.ConnectionClosed as e:
            raise ChannelClosed(str(e)) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)


def _refusal(config: AgentConfig, msg: protocol.SessionOpen) -> str:
    """Why this device does not run ``msg`` ("" when it does), before anything is opened."""
    r = config.remote
    feature = {"terminal": ("terminal", "terminals"), "forward": ("forward", "port forwarding"),
               "upload": ("files", "file transfer"), "download": ("files", "file transfer")}[msg.kind]
    if not getattr(r, feature[0]):
        return f"{feature[1]} is turned off on this device ([remote] {feature[0]} = false)"
    if not msg.relay_url.startswith(("ws://", "wss://")):
        return f"the relay URL {msg.relay_url!r} is not a WebSocket URL"
    if config.device_url.startswith("wss://") and not msg.relay_url.startswith("wss://"):
        return "the relay URL is not TLS while the server's is"
    return ""


async def run_session(config: AgentConfig, msg: protocol.SessionOpen, refuse: Refuse,
                      limit: Any = None) -> None:
    """Run one session to its end (a task of the agent's). ``limit``: the terminals' counter."""
    from corral.agent import remote

    why = _refusal(config, msg)
    slot = None
    if not why and msg.kind == "terminal" and limit is not None:
        slot = limit.try_acquire()
        if slot is None:
            why = f"{config.remote.max_sessions} terminal sessions are open already ([remote] max_sessions)"
    if why:
        log.warning("session %s (%s) refused: %s", msg.session_id, msg.kind, why)
        await refuse(why)
        return
    log.info("session %s: %s for %s", msg.session_id, msg.kind, msg.user or "an operator")
    proxy = config.proxy
    proxy_url = None if proxy == "none" else transport.proxy_from_environment(msg.relay_url) if proxy == "auto" \
        else proxy  # the same way out as the control connection (a device behind a proxy)
    try:
        async with transport.connect(msg.relay_url, subprotocol=SESSION_SUBPROTOCOL, proxy=proxy_url,
                                     max_size=config.remote.chunk_bytes * 4 + 65536,
                                     open_timeout=config.connect_timeout,
                                     headers=[("Authorization", f"Bearer {msg.token}")]) as ws:
            ch = TransportChannel(ws)
            p = msg.params
            if msg.kind == "terminal":
                await remote.run_terminal(ch, int(p.get("cols", 80)), int(p.get("rows", 24)), config.remote)
            elif msg.kind == "forward":
                await remote.run_forward(ch, str(p["host"]), int(p["port"]), config.remote)
            elif msg.kind == "upload":
                await remote.run_upload(ch, str(p["path"]), int(p["size"]), str(p["sha256"]), int(p.get("mode", 0o644)),
                                        config.remote)
            else:
                await remote.run_download(ch, str(p["path"]), config.remote)
    except (transport.WebSocketError, OSError, TimeoutError) as e:
        log.warning("session %s: %s", msg.session_id, e)
    finally:
        if slot is not None:
            slot.release()
        log.info("session %s ended", msg.session_id)
