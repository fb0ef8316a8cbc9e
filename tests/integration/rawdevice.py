"""A minimal device speaking the wire protocol by hand, for attacks and malformed input."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from corral import protocol as p

codec = p.Codec()


@dataclass
class Key:
    private: Ed25519PrivateKey

    @classmethod
    def new(cls) -> Key:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def device_id(self) -> str:
        return p.device_id_for(self.public)

    def hello(self, nonce: bytes, token: str | None = None) -> p.Hello:
        sig = self.private.sign(p.hello_signing_payload(nonce, self.device_id, self.public))
        return p.Hello(device_id=self.device_id, public_key=self.public, signature=sig, enroll_token=token)


async def open_ws(ws_url: str, **kw: Any) -> ClientConnection:
    return await connect(ws_url, subprotocols=[p.PROTOCOL], open_timeout=10, **kw)  # type: ignore[list-item]


async def challenge(ws: ClientConnection) -> bytes:
    _, ch = codec.expect(await asyncio.wait_for(ws.recv(), 10), p.Challenge)
    return ch.nonce


async def recv_type(ws: ClientConnection, kind: type, timeout: float = 10) -> Any:
    """The next frame of ``kind``, skipping others (rules, heartbeat acks, ...)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        _, body = codec.decode(await asyncio.wait_for(ws.recv(), max(0.1, deadline - loop.time())))
        if isinstance(body, kind):
            return body


async def close_code(ws: ClientConnection, timeout: float = 10) -> int | None:
    """Read until the server closes; return its close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None


async def connect_device(ws_url: str, key: Key, token: str | None = None) -> tuple[ClientConnection, Any]:
    """Handshake; returns the socket and the welcome body (or the close code as an int)."""
    ws = await open_ws(ws_url)
    nonce = await challenge(ws)
    await ws.send(codec.encode(key.hello(nonce, token)))
    try:
        _, body = codec.decode(await asyncio.wait_for(ws.recv(), 10))
        return ws, body
    except ConnectionClosed as e:
        return ws, (e.rcvd.code if e.rcvd else None)
