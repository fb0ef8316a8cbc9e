"""The seam between a remote-access session and its transport.

Every session (terminal, forward, file transfer) runs over a :class:`Channel`: in the agent, the
session's own WebSocket to the server's relay; in tests, one end of :func:`memory_pair`.

- A **binary** message is stream data (terminal output or keystrokes, forwarded bytes, file
  contents). A **text** message is one JSON object with a ``"type"``: a control message.
- Control messages shared by the session kinds: ``resize`` ``{cols, rows}``, ``exit`` ``{code}``,
  ``error`` ``{message}``, ``eof`` ``{}``; the file transfers add ``file`` ``{size}`` and ``done``
  ``{bytes, sha256}`` (and ``sha256`` on their ``eof``). Fields a side does not know are ignored.
- :meth:`Channel.send` returns once the transport has accepted the message: a session sends its
  next chunk only then, which is all the backpressure there is (and all there needs to be).

A session that refuses or fails sends ``{"type": "error", "message": ...}`` and closes the channel
(:func:`refuse`), then raises :class:`RemoteError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any, Protocol

import msgspec

from corral.errors import CorralError

log = logging.getLogger("corral.agent.remote")

#: WebSocket close codes a session closes its channel with
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # refused: the feature is off, a target or path not allowed, over a limit
CLOSE_ERROR = 1011  # failed: the target could not be reached, a file could not be written ...

#: a WebSocket close reason is at most 123 bytes
_MAX_REASON = 123
#: how long a session's last message (``exit``, ``done``, ``error`` ...) may wait for a client
#: that does not read, before the channel is closed without it
FINAL_SEND_TIMEOUT = 10.0


class ChannelClosed(Exception):
    """The other side is gone (or this side closed the channel)."""


class RemoteError(CorralError):
    """A session was refused or failed. The peer has been sent ``{"type": "error", "message":
    detail}`` and the channel is closed when this is raised."""

    code = "remote_error"


class Channel(Protocol):
    """One session's message stream. Implementations: ``close`` is idempotent, and a ``send``
    that is cancelled has delivered its whole message or none of it."""

    async def recv(self) -> bytes | str:
        """The next message: ``bytes`` = stream data, ``str`` = one JSON control message.
        Raises :class:`ChannelClosed` when the other side is gone."""
        ...

    async def send(self, data: bytes | str) -> None:
        """Returns when the transport has accepted ``data`` (backpressure). Raises
        :class:`ChannelClosed` when the other side is gone."""
        ...

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None: ...


# --- control messages -------------------------------------------------------------------------


def control(kind: str, **fields: Any) -> str:
    """A control message: ``control("exit", code=0)`` → ``'{"type":"exit","code":0}'``."""
    return msgspec.json.encode({"type": kind, **fields}).decode()


def parse_control(text: str) -> dict[str, Any] | None:
    """The JSON object of a control message, or ``None`` when ``text`` is not one (not JSON, not
    an object, no string ``"type"``): a session ignores such a message, as it ignores a type it
    does not know."""
    try:
        msg = msgspec.json.decode(text)
    except msgspec.DecodeError:
        msg = None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        log.debug("remote: ignoring a text message that is not a control message: %.80r", text)
        return None
    return msg


def short_reason(message: str) -> str:
    """``message`` cut to fit a WebSocket close reason (123 bytes of UTF-8)."""
    data = message.encode()
    if len(data) <= _MAX_REASON:
        return message
    return data[: _MAX_REASON - 3].decode(errors="ignore") + "..."


async def finish(ch: Channel, message: str | None, code: int = CLOSE_NORMAL, reason: str = "") -> None:
    """A session's last control ``message`` (if any; waited for at most FINAL_SEND_TIMEOUT),
    then the close. A peer that is gone already is no error here."""
    if message is not None:
        with contextlib.suppress(ChannelClosed, TimeoutError):
            await asyncio.wait_for(ch.send(message), FINAL_SEND_TIMEOUT)
    with contextlib.suppress(ChannelClosed):
        await ch.close(code, short_reason(reason))


async def refuse(ch: Channel, message: str, code: int = CLOSE_POLICY) -> RemoteError:
    """Tell the peer why the session ends (``error``), close the channel, and return the
    :class:`RemoteError` for the caller to raise."""
    await finish(ch, control("error", message=message), code, message)
    return RemoteError(message)


# --- an in-memory pair, for tests -------------------------------------------------------------


class MemoryChannel:
    """One end of :func:`memory_pair`. Messages sent wait in the peer's inbox (at most
    ``maxsize`` of them: a full inbox makes ``send`` wait, as a slow WebSocket does). After a
    close, the messages sent before it are still received, then :class:`ChannelClosed`."""

    def __init__(self, maxsize: int, cond: asyncio.Condition) -> None:
        self._inbox: deque[bytes | str] = deque()
        self._maxsize = maxsize
        self._cond = cond
        self.peer: MemoryChannel = self
        #: set when this end closed: (code, reason)
        self.closed: tuple[int, str] | None = None

    @property
    def peer_closed(self) -> tuple[int, str] | None:
        """How the other end closed, if it did."""
        return self.peer.closed

    def _gone(self) -> bool:
        return self.closed is not None or self.peer.closed is not None

    async def recv(self) -> bytes | str:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._inbox) or self._gone())
            if self._inbox and self.closed is None:
                msg = self._inbox.popleft()
                self._cond.notify_all()
                return msg
            raise ChannelClosed("the channel is closed")

    async def send(self, data: bytes | str) -> None:
        if not isinstance(data, bytes | str):
            raise TypeError(f"a channel sends bytes or str, not {type(data).__name__}")
        async with self._cond:
            await self._cond.wait_for(lambda: len(self.peer._inbox) < self._maxsize or self._gone())
            if self._gone():
                raise ChannelClosed("the channel is closed")
            self.peer._inbox.append(data)
            self._cond.notify_all()

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        async with self._cond:
            if self.closed is None:
                self.closed = (code, reason)
            self._cond.notify_all()

    def pending(self) -> int:
        """Messages waiting in this end's inbox."""
        return len(self._inbox)


def memory_pair(maxsize: int = 8) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected channels, each inbox bounded to ``maxsize`` messages."""
    if maxsize < 1:
        raise ValueError("maxsize must be at least 1")
    cond = asyncio.Condition()
    a, b = MemoryChannel(maxsize, cond), MemoryChannel(maxsize, cond)
    a.peer, b.peer = b, a
    return a, b
