"""A port-forward session: one TCP connection from the device to ``host:port``, over a
:class:`Channel`.

The target is checked **on the device**, whatever the server asked for: against ``[remote]
allow`` (:class:`~corral.core.remote.TargetPolicy`; default: the loopback only). The host is
resolved with the event loop's ``getaddrinfo``; it is allowed when the name itself matches an
entry, or when every address it resolves to does (a name cannot smuggle in an address that is
not allowed). The connection then goes to those very addresses, not to a second resolution of
the name.

On the channel:

- in: binary frames, written to the TCP connection; ``{"type": "eof"}``: the client has no more
  to send (the connection's write side is shut down: a half-close); ``{"type": "error"}``: the
  client gave up (the connection is reset).
- out: binary frames of what the target sent (at most ``chunk_bytes`` each); ``{"type": "eof"}``
  when the target shut down its side; ``{"type": "error", "message"}`` when the target is not
  allowed, cannot be reached, or resets the connection.

The session ends when both sides have sent ``eof`` (the channel is closed normally), or when
either side fails or goes away. **Bounded memory**: the stream reader holds at most about two
chunks before it stops reading the socket, the writer's buffer is waited on (``drain``) before
the next frame is received, and the next chunk is read only once ``send`` has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from corral.agent.config import RemoteConfig
from corral.agent.remote.channel import (
    CLOSE_ERROR,
    Channel,
    ChannelClosed,
    control,
    finish,
    parse_control,
    refuse,
)
from corral.core.remote import TargetPolicy

log = logging.getLogger("corral.agent.remote.forward")

AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


@dataclass(frozen=True)
class Relayed:
    """What a forward session carried, for the audit log."""

    to_target: int
    from_target: int


class _PeerGaveUp(Exception):
    """The client sent ``error``: it has said why already."""


def policy_of(config: RemoteConfig) -> TargetPolicy:
    return TargetPolicy(config.allow) if config.allow is not None else TargetPolicy()


async def allowed_addresses(host: str, port: int, policy: TargetPolicy) -> list[AddrInfo]:
    """The addresses to connect to for ``host:port``, once the policy allows them;
    :class:`PermissionError` (not allowed) or :class:`OSError` (cannot be resolved) otherwise,
    with a message for the client."""
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name or not 0 < port < 65536:
        raise PermissionError(f"{host!r}:{port} is not a forward target (HOST and a port 1-65535 expected)")
    denied = PermissionError(f"{host}:{port} is not an allowed forward target on this device (remote.allow)")
    by_name = policy.allows(name, port)
    if not by_name and _is_address(name):
        raise denied  # an address: nothing to resolve
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {name}: {e.strerror or e}") from None
    unique: list[AddrInfo] = []
    for info in infos:
        if info not in unique:
            unique.append(info)
    if not unique:
        raise OSError(f"cannot resolve {name}: no addresses")
    if not by_name and not all(policy.allows(str(info[4][0]), port) for info in unique):
        raise denied
    return unique


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def _connect(infos: list[AddrInfo], timeout: float, limit: int
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    problems: list[str] = []
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
            return await asyncio.open_connection(sock=sock, limit=limit)
        except TimeoutError:
            sock.close()
            problems.append(f"{sockaddr[0]}: no answer in {timeout:g} s")
        except OSError as e:
            sock.close()  # asyncio's message names the address again: the errno's says what happened
            problems.append(f"{sockaddr[0]}: {os.strerror(e.errno) if e.errno else e}")
        except BaseException:
            sock.close()
            raise
    raise OSError("; ".join(problems))


class _Forward:
    def __init__(self, ch: Channel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunk: int) -> None:
        self.ch = ch
        self.reader = reader
        self.writer = writer
        self.chunk = chunk
        self.to_target = 0
        self.from_target = 0
        # done once the client said eof: a plain future that ``run`` waits on with the two tasks (a
        # third task waiting on an Event cost about 1 KB a session, and idle sessions are many)
        self.client_eof: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def downstream(self) -> None:
        """Target → channel, then ``eof``."""
        while data := await self.reader.read(self.chunk):
            await self.ch.send(data)
            self.from_target += len(data)
        await self.ch.send(control("eof"))

    async def upstream(self) -> None:
        """Channel → target, for as long as the channel is open (after the client's ``eof`` it
        is still received from, to notice it closing)."""
        while True:
            msg = await self.ch.recv()
            if isinstance(msg, bytes):
                if self.client_eof.done():
                    log.debug("forward: %d bytes after eof ignored", len(msg))
                    continue
                self.writer.write(msg)
                await self.writer.drain()
                self.to_target += len(msg)
                continue
            ctl = parse_control(msg)
            if ctl is None:
                continue
            if ctl["type"] == "eof" and not self.client_eof.done():
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                self.client_eof.set_result(None)
            elif ctl["type"] == "error":
                raise _PeerGaveUp(str(ctl.get("message", "")))

    async def run(self, target: str) -> None:
        up = asyncio.create_task(self.upstream())
        down = asyncio.create_task(self.downstream())
        eof = self.client_eof
        pending: set[asyncio.Future[Any]] = {up, down, eof}
        clean = False
        failure: BaseException | None = None
        try:
            while not clean and failure is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failure = next((e for t in done if (e := t.exception()) is not None), None)
                clean = down.done() and eof.done()
        finally:
            for task in (up, down, eof):
                task.cancel()
            await asyncio.gather(up, down, eof, return_exceptions=True)
            if clean:
                self.writer.close()
            else:
                self.writer.transport.abort()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        if failure is not None:
            await self._failed(target, failure)
        await finish(self.ch, None)

    async def _failed(self, target: str, exc: BaseException) -> None:
        if isinstance(exc, ChannelClosed | _PeerGaveUp):
            log.info("forward to %s: the client ended it (%s)", target, exc or "gone")
            return
        if isinstance(exc, OSError):
            message = f"the connection to {target} failed: {exc.strerror or exc}"
            log.info("forward: %s", message)
        else:
            log.error("forward to %s failed", target, exc_info=exc)
            message = f"the forward to {target} failed: {exc}"
        await refuse(self.ch, message, CLOSE_ERROR)


async def run_forward(ch: Channel, host: str, port: int, config: RemoteConfig) -> Relayed:
    """Connect to ``host:port`` if ``[remote] allow`` lets this device reach it, and relay bytes
    both ways over ``ch`` until both sides sent ``eof`` or either one goes away (the channel is
    closed on return). :class:`~corral.agent.remote.channel.RemoteError` when forwarding is off,
    the target is not allowed (no connection is attempted) or cannot be reached: the peer got
    ``error`` first, and nothing was relayed."""
    if not config.forward:
        raise await refuse(ch, "port forwarding is turned off on this device (remote.forward = false)")
    target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        infos = await allowed_addresses(host, port, policy_of(config))
    except PermissionError as e:
        log.warning("forward: refused %s: not allowed by remote.allow", target)
        raise await refuse(ch, str(e)) from None
    except OSError as e:
        raise await refuse(ch, str(e), CLOSE_ERROR) from None
    try:
        reader, writer = await _connect(infos, config.connect_timeout, config.chunk_bytes)
    except OSError as e:
        raise await refuse(ch, f"cannot connect to {target}: {e}", CLOSE_ERROR) from None
    log.info("forward: connected to %s", target)
    session = _Forward(ch, reader, writer, config.chunk_bytes)
    await session.run(target)
    log.info("forward to %s ended: %d bytes to it, %d from it", target, session.to_target, session.from_target)
    return Relayed(session.to_target, session.from_target)

