"""The relay worker: the child process of the server that carries remote-access sessions' bytes
(issue 6, ADR 0016).

Why a process of its own: a session relaying at full speed is pure CPU work (parse a frame,
unmask it, frame it again, write it), and on the server's event loop a hundred such sessions made
every loop iteration last 150-250 ms. Each telemetry ack takes about ten loop iterations (its
database round trips), so other devices' telemetry waited seconds (bench/relay). Here the bytes
never touch the server's event loop: once the server has checked a session's token, it hands the
connection itself (its file descriptor, before the WebSocket handshake) to this process, which
answers the handshake and relays. The server keeps only the session's record.

The link to the server is one ``SOCK_SEQPACKET`` Unix socket: one JSON message per packet, a
connection's descriptor attached to ``adopt`` (SCM_RIGHTS). The server says ``adopt`` (a side
of a session, with its HTTP request), ``fail`` (the device refused or never came), ``end`` (an
admin ended it) and ``stop``; this process says ``closed`` once per session, with its status,
reason and bytes each way. When the server goes away (end of file on the link), this process
closes every session and exits.

Each end is an :class:`asyncio.Protocol` around websockets' sans-I/O protocol (``ServerProtocol``
for the handshake, then the base ``Protocol`` for frames): no task and no queue per session.
Frames are relayed as they come (fragments as fragments), so nothing waits for a whole message;
when one side's socket buffer is full, the other side is not read (``pause_reading``), so a slow
side slows the fast one instead of filling memory. A message over :data:`MAX_FRAME` closes the
session with 1009. No permessage-deflate: compression cost the relay nine tenths of its
throughput, and a terminal's or a tunnel's bytes are small or already compressed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any, cast

from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol, Side, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from corral.core.remote import Asciicast

log = logging.getLogger("corral.relay")

#: the largest relayed message, either way (a larger one closes the session with 1009)
MAX_FRAME = 256 * 1024
#: the largest control message between the server and this process
CONTROL_MAX = 64 * 1024
#: a side's socket buffer beyond which the other side is no longer read
WRITE_HIGH = 256 * 1024
CLOSE_TOO_BIG = 1009
#: how long a side that was sent a close frame has to answer it before its socket is dropped
CLOSE_WAIT = 5.0


def error_text(message: str) -> str:
    """How the operator is told why a session ended (a text message before the close)."""
    return json.dumps({"type": "error", "message": message})


@dataclass(eq=False, slots=True)
class Session:
    """One session's two ends and its counters (this process's view)."""

    id: str
    kind: str
    recording: str | None
    cols: int
    rows: int
    title: str
    ends: dict[str, End] = field(default_factory=dict)
    to_device: int = 0
    from_device: int = 0
    cast: Asciicast | None = None
    out: IO[str] | None = None
    done: bool = False

    def paired(self) -> bool:
        return "operator" in self.ends and "device" in self.ends

    def peer(self, side: str) -> End | None:
        return self.ends.get("device" if side == "operator" else "operator")

    def start_recording(self) -> None:
        if self.recording is None or self.cast is not None:
            return
        try:
            self.out = open(self.recording, "w", encoding="utf-8")  # noqa: SIM115  # closed in finish
        except OSError as e:
            log.warning("session %s: not recorded: %s", self.id, e)
            self.recording = None
            return
        self.cast = Asciicast(self.out, self.cols, self.rows, time.time(), title=self.title)
        self.cast.header()


#: why a side is not read (bits of ``End.blocked``)
UNPAIRED = 1  # its peer is not there yet
PEER_BUSY = 2  # its peer's socket buffer is full


class End(asyncio.Protocol):
    """One side of a session: a WebSocket whose handshake this process answers. (Slots, and the
    handshake's objects dropped once it is done: a thousand idle sessions are two thousand of these.)"""

    __slots__ = ("blocked", "continuing", "early", "request", "session", "side", "subprotocols", "transport",
                 "worker", "ws")

    def __init__(self, worker: Worker, session: Session, side: str, request: bytes,
                 subprotocols: list[str]) -> None:
        self.worker = worker
        self.session = session
        self.side = side
        self.request: bytes | None = request  # the HTTP request, as the server read it before handing it over
        self.subprotocols: list[str] | None = subprotocols
        self.ws = Protocol(Side.SERVER, state=State.CONNECTING, max_size=MAX_FRAME)  # replaced once open
        self.transport: asyncio.Transport | None = None
        self.blocked = 0  # UNPAIRED | PEER_BUSY
        #: what arrived before the peer did (one read at most: reading is paused then)
        self.early: list[bytes] | None = None
        self.continuing = Opcode.BINARY  # the type of the message whose fragments are coming

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        handshake = ServerProtocol(subprotocols=[Subprotocol(p) for p in self.subprotocols or ()] or None)
        handshake.receive_data(self.request or b"")
        self.request = self.subprotocols = None
        requests = [r for r in handshake.events_received() if isinstance(r, Request)]
        response = handshake.accept(requests[0]) if requests else handshake.reject(400, "no request")
        handshake.send_response(response)
        for chunk in handshake.data_to_send():
            transport.write(chunk)
        if response.status_code != 101:
            transport.close()
            self.worker.finish(self.session, "closed", f"the {self.side}'s WebSocket handshake failed")
            return
        # the frames from here on: the base protocol, without the handshake's request and parser
        self.ws = Protocol(Side.SERVER, state=State.OPEN, max_size=MAX_FRAME)
        self.session.ends[self.side] = self
        if self.session.done:  # ended while this side was on its way
            self.close(1000)
            return
        peer = self.session.peer(self.side)
        if peer is None:
            self.block(UNPAIRED)
        else:
            peer.unblock(UNPAIRED)
            self.session.start_recording()

    def data_received(self, data: bytes) -> None:
        if self.blocked & UNPAIRED:  # uvloop reads once even when paused in connection_made
            self.early = [*(self.early or ()), data]
            return
        self.ws.receive_data(data)
        self.handle_events()

    def eof_received(self) -> bool:
        self.ws.receive_eof()
        self.handle_events()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.closing.discard(self)
        if not self.session.done:
            self.worker.finish(self.session, "closed", self.gone())

    def pause_writing(self) -> None:
        peer = self.session.peer(self.side)
        if peer is not None:
            peer.block(PEER_BUSY)

    def resume_writing(self) -> None:
        peer = self.session.peer(self.side)
        if peer is not None:
            peer.unblock(PEER_BUSY)

    # --- relaying ---

    def gone(self) -> str:
        return f"the {self.side} closed the session"

    def handle_events(self) -> None:
        session = self.session
        peer = session.peer(self.side)
        for frame in self.ws.events_received():
            if not isinstance(frame, Frame) or session.done:
                continue
            if frame.opcode is Opcode.CLOSE:
                self.flush()  # the close reply
                self.worker.finish(session, "closed", self.gone())
                return
            if frame.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT) or peer is None:
                continue
            self.relay(frame, peer)
        self.flush()
        if peer is not None:
            peer.flush()
        if isinstance(self.ws.parser_exc, PayloadTooBig) and not session.done:
            self.worker.finish(session, "closed", f"a message over {MAX_FRAME} bytes (the limit)",
                               code=CLOSE_TOO_BIG)
        elif self.ws.state is State.CLOSED and not session.done:
            self.worker.finish(session, "closed", self.gone())

    def relay(self, frame: Frame, peer: End) -> None:
        session = self.session
        data = frame.data
        if self.side == "operator":
            session.to_device += len(data)
        else:
            session.from_device += len(data)
        opcode = frame.opcode if frame.opcode is not Opcode.CONT else self.continuing
        if frame.opcode is not Opcode.CONT:
            self.continuing = frame.opcode
        if frame.opcode is Opcode.CONT:
            peer.ws.send_continuation(data, fin=frame.fin)
        elif opcode is Opcode.TEXT:
            peer.ws.send_text(data, fin=frame.fin)
        else:
            peer.ws.send_binary(data, fin=frame.fin)
        cast = session.cast
        if cast is not None:
            if self.side == "device" and opcode is Opcode.BINARY:
                cast.output(time.time(), bytes(data))
            elif self.side == "operator" and frame.opcode is Opcode.TEXT and frame.fin:
                record_control(cast, bytes(data))

    def flush(self) -> None:
        out = self.ws.data_to_send()
        if self.transport is not None and not self.transport.is_closing():
            for chunk in out:
                if chunk:
                    self.transport.write(chunk)
            if self.ws.close_expected():
                self.transport.close()

    def block(self, why: int) -> None:
        if not self.blocked and self.transport is not None:
            self.transport.pause_reading()
        self.blocked |= why

    def unblock(self, why: int) -> None:
        if self.blocked & why:
            self.blocked &= ~why
            early, self.early = self.early, None
            for data in early or ():
                self.data_received(data)
            if not self.blocked and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def say(self, message: str) -> None:
        """A text message to this side, if it is still open (the operator's last word)."""
        if self.ws.state is State.OPEN:
            self.ws.send_text(message.encode())
            self.flush()

    def close(self, code: int, reason: str = "") -> None:
        """Send the close frame, then keep reading (and dropping) what the peer still sends until
        its close reply, for :data:`CLOSE_WAIT` seconds at most. Closing the socket at once, with
        the peer's data unread, would make the kernel reset the connection, and the reset can
        overtake the last words (the reason, the close frame) on their way to the peer."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason[:120])
            self.flush()
        if transport.is_closing():  # the handshake was already over (flush closed it)
            return
        self.blocked, self.early = 0, None
        transport.resume_reading()
        self.worker.closing.add(self)
        self.worker.loop.call_later(CLOSE_WAIT, transport.abort)


def record_control(cast: Asciicast, text: bytes) -> None:
    """A terminal's resize, from the operator's control messages, into its recording."""
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        doc = json.loads(text)
        if doc.get("type") == "resize":
            cast.resize(time.time(), int(doc["cols"]), int(doc["rows"]))


class Worker:
    """This process's sessions and its link to the server."""

    def __init__(self, link: socket.socket) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.sessions: dict[str, Session] = {}
        #: ends that were sent a close frame and wait for the reply (CLOSE_WAIT at most)
        self.closing: set[End] = set()
        self.backlog: list[bytes] = []
        self.stopped = self.loop.create_future()

    # --- the link ---

    def start(self) -> None:
        self.link.setblocking(False)
        self.loop.add_reader(self.link.fileno(), self.readable)

    def readable(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.link, CONTROL_MAX, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("relay link: %s", e)
                data, fds = b"", []
            if not data:  # the server is gone: so are its sessions
                for fd in fds:
                    os.close(fd)
                self.stop("the server is stopping")
                return
            try:
                self.command(json.loads(data), fds)
            except Exception:  # one bad message must not take every session down
                log.exception("relay: bad control message")
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def report(self, doc: dict[str, Any]) -> None:
        self.backlog.append(json.dumps(doc).encode())
        self.send_backlog()

    def send_backlog(self) -> None:
        while self.backlog:
            try:
                self.link.send(self.backlog[0])
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.link.fileno(), self.writable)
                return
            except OSError:  # the server is gone
                self.backlog.clear()
                return
            self.backlog.pop(0)

    def writable(self) -> None:
        self.loop.remove_writer(self.link.fileno())
        self.send_backlog()

    # --- commands ---

    def command(self, doc: dict[str, Any], fds: list[int]) -> None:
        op = doc.get("op")
        if op == "adopt":
            if len(fds) != 1:
                raise ValueError("adopt without a connection")
            self.adopt(doc, fds[0])
        elif op == "fail":
            session = self.sessions.get(str(doc.get("sid")))
            if session is not None:
                self.finish(session, str(doc.get("status", "refused")), str(doc.get("reason", "")),
                            code=int(doc.get("code", 4403)))
        elif op == "end":
            session = self.sessions.get(str(doc.get("sid")))
            if session is not None:
                self.finish(session, str(doc.get("status", "ended")), str(doc.get("reason", "")))
        elif op == "stop":
            self.stop(str(doc.get("reason", "the server is stopping")))
        else:
            raise ValueError(f"unknown op {op!r}")

    def adopt(self, doc: dict[str, Any], fd: int) -> None:
        sid = str(doc["sid"])
        side = str(doc["side"])
        if side not in ("operator", "device"):
            os.close(fd)
            raise ValueError(f"unknown side {side!r}")
        session = self.sessions.get(sid)
        if session is None:
            if side != "operator":  # the session ended before its device came
                os.close(fd)
                return
            session = Session(sid, str(doc.get("kind", "")), doc.get("recording"), int(doc.get("cols", 80)),
                              int(doc.get("rows", 24)), str(doc.get("title", "")))
            self.sessions[sid] = session
        request = str(doc.get("request", "")).encode("latin-1")
        sock = socket.socket(fileno=fd)
        end = End(self, session, side, request, list(doc.get("subprotocols", [])))
        self.loop.create_task(self._connect(sock, end))

    async def _connect(self, sock: socket.socket, end: End) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: end, sock)
        except OSError as e:
            sock.close()
            if not end.session.done:
                self.finish(end.session, "closed", f"the {end.side}'s connection failed: {e}")

    def finish(self, session: Session, status: str, reason: str, code: int = 1000) -> None:
        """End a session once: the operator is told why (unless it is the one who closed it),
        both sides are closed, and the server is told the outcome."""
        if session.done:
            return
        session.done = True
        operator = session.ends.get("operator")
        if operator is not None:
            operator.say(error_text(reason))
        for end in session.ends.values():
            end.close(code, reason)
        if session.out is not None:
            session.out.close()
        self.sessions.pop(session.id, None)
        self.report({"op": "closed", "sid": session.id, "status": status, "reason": reason,
                     "to_device": session.to_device, "from_device": session.from_device,
                     "recorded": session.cast is not None})

    def drop_closing(self) -> None:
        """Drop the connections still waiting for their close reply (this process is ending)."""
        for end in list(self.closing):
            if end.transport is not None:
                end.transport.abort()

    def stop(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            self.finish(session, "closed", reason, code=1001)
        if not self.stopped.done():
            self.stopped.set_result(None)


async def serve(fd: int) -> None:
    link = socket.socket(fileno=fd)
    worker = Worker(link)
    worker.start()
    worker.loop.add_signal_handler(signal.SIGTERM, worker.stop, "the server is stopping")
    await worker.stopped
    await asyncio.sleep(0.2)  # let the last close frames and reports go out
    worker.send_backlog()
    worker.drop_closing()


def main(argv: Iterable[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("CORRAL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    if len(args) > 1:  # bulk bytes yield to the server's own work when both want a core (RemoteAccess)
        os.nice(int(args[1]))
    uvloop.run(serve(int(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
