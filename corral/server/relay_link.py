"""The server's side of the link to its relay worker (:mod:`corral.server.relay_worker`): start
it, hand it connections, tell it what the server decided, hear how sessions ended, and start it
again if it dies (its sessions are then over, and said so)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from corral.server.relay_worker import CONTROL_MAX

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], Awaitable[None]]


class RelayLink:
    def __init__(self, on_report: Report, on_lost: Callable[[], Awaitable[None]], nice: int = 0) -> None:
        self.nice = nice
        self.on_report = on_report
        self.on_lost = on_lost
        self.sock: socket.socket | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral.server.relay_worker", str(theirs.fileno()), str(self.nice),
                pass_fds=[theirs.fileno()], stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable)
        log.info("relay worker started (pid %s)", self.proc.pid)

    async def send(self, doc: dict[str, Any], conn: socket.socket | None = None) -> None:
        """One control message (with a connection handed over, which is closed here either way)."""
        data = json.dumps(doc).encode()
        try:
            sock = self.sock
            if sock is None:
                raise ConnectionError("the relay worker is not running")
            loop = asyncio.get_running_loop()
            while True:
                try:
                    socket.send_fds(sock, [data], [conn.fileno()] if conn is not None else [])
                    return
                except (BlockingIOError, InterruptedError):
                    ready = loop.create_future()
                    loop.add_writer(sock.fileno(), ready.set_result, None)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(sock.fileno())
        finally:
            if conn is not None:
                conn.close()  # the worker has its own descriptor now (or the connection is dropped)

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, CONTROL_MAX, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:  # the worker never sends any
                socket.close(fd)
            if not data:
                self._lost()
                return
            try:
                doc = json.loads(data)
            except ValueError:
                log.warning("relay worker: unreadable report %r", data[:200])
                continue
            self._spawn(self.on_report(doc))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        if self.stopping:
            return
        log.error("the relay worker stopped unexpectedly; starting it again")

        async def restart() -> None:
            await self.on_lost()
            if self.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
            await asyncio.sleep(0.5)  # a worker that dies at once must not spin
            if not self.stopping:
                await self.start()

        self._spawn(restart())

    async def stop(self, reason: str, timeout: float = 3.0) -> None:
        """Ask the worker to end its sessions (the operators are told ``reason``) and exit."""
        self.stopping = True
        with contextlib.suppress(ConnectionError, OSError):
            await self.send({"op": "stop", "reason": reason})
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._tasks:  # the reports of the sessions it ended
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self.sock is not None:
            self._readable()  # what is still in the socket
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
