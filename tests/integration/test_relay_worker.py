"""The relay worker on its own (``corral.server.relay_worker``), in this process's event loop, driven
through its real link (a SOCK_SEQPACKET pair) with real loopback connections handed over as the
server hands them: what an operator types before the device's end arrives is relayed once it does;
fragments stay fragments; a message over the limit closes both sides with 1009; a refusal and an
admin's end are told to the operator; a device that does not read stops the operator's side being
read (bounded buffers); the server going away closes every session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage

from corral.server.relay_worker import MAX_FRAME, PEER_BUSY, WRITE_HIGH, Worker


class Harness:
    """A worker, its link's other end (as the server holds it) and a listening socket whose
    connections are handed over with their HTTP request, as the server does."""

    def __init__(self) -> None:
        self.server_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.worker = Worker(worker_end)
        self.worker.start()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.server_end.setblocking(False)
        self.reports: list[dict[str, Any]] = []

    async def handover(self, sid: str, side: str, **extra: Any) -> ClientConnection:
        loop = asyncio.get_running_loop()
        port = self.listener.getsockname()[1]
        client = asyncio.ensure_future(connect(f"ws://127.0.0.1:{port}/s/{sid}", compression=None, open_timeout=10,
                                               subprotocols=["corral.session.v1"] if side == "device" else None))
        conn, _ = await loop.sock_accept(self.listener)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(conn, 65536)
        doc = {"op": "adopt", "sid": sid, "side": side, "kind": extra.pop("kind", "forward"),
               "request": head.decode("latin-1"),
               "subprotocols": ["corral.session.v1"] if side == "device" else [], **extra}
        socket.send_fds(self.server_end, [json.dumps(doc).encode()], [conn.fileno()])
        conn.close()
        return await client

    def send(self, doc: dict[str, Any]) -> None:
        self.server_end.send(json.dumps(doc).encode())

    async def report(self) -> dict[str, Any]:
        for _ in range(200):
            try:
                self.reports.append(json.loads(self.server_end.recv(65536)))
                return self.reports[-1]
            except BlockingIOError:
                await asyncio.sleep(0.05)
        raise AssertionError("no report from the relay worker")

    def close(self) -> None:
        self.worker.drop_closing()
        self.listener.close()
        self.server_end.close()
        link = self.worker.link
        if link.fileno() >= 0:
            self.worker.loop.remove_reader(link.fileno())
            link.close()


async def drain_error(ws: ClientConnection) -> tuple[list[Any], int | None]:
    messages = []
    try:
        while True:
            messages.append(await asyncio.wait_for(ws.recv(), 10))
    except ConnectionClosed as e:
        return messages, e.rcvd.code if e.rcvd else None


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_what_the_operator_sends_before_the_device_arrives_is_relayed_and_fragments_stay_whole(
        tmp_path: Any) -> None:
    async def go() -> None:
        h = Harness()
        try:
            op = await h.handover("s1", "operator", kind="terminal", recording=str(tmp_path / "s1.cast"),
                                  cols=100, rows=30, title="t")
            await op.send(b"typed early")
            resize = json.dumps({"type": "resize", "cols": 120, "rows": 40})
            await op.send(resize)
            await asyncio.sleep(0.2)
            dev = await h.handover("s1", "device")
            assert await asyncio.wait_for(dev.recv(), 10) == b"typed early"
            assert json.loads(await asyncio.wait_for(dev.recv(), 10))["cols"] == 120
            await op.send([b"frag-", b"ment-", b"ed"])  # one message in three frames
            assert await asyncio.wait_for(dev.recv(), 10) == b"frag-ment-ed"
            await dev.send(b"$ output")
            assert await asyncio.wait_for(op.recv(), 10) == b"$ output"
            await dev.close()
            messages, _ = await drain_error(op)
            assert [json.loads(m)["message"] for m in messages] == ["the device closed the session"]
            report = await h.report()
            assert (report["sid"], report["status"], report["reason"]) == \
                ("s1", "closed", "the device closed the session")
            assert (report["to_device"], report["from_device"], report["recorded"]) == \
                (len(b"typed early") + len(resize) + len(b"frag-ment-ed"), 8, True)
            cast = (tmp_path / "s1.cast").read_text().splitlines()
            assert json.loads(cast[0])["width"] == 100
            events = [json.loads(line) for line in cast[1:]]
            assert [e[1:] for e in events] == [["r", "120x40"], ["o", "$ output"]]
        finally:
            h.worker.stop("test over")
            h.close()
            await asyncio.sleep(0.05)  # the dropped connections' callbacks

    run(go())


def test_a_message_over_the_limit_closes_both_sides_with_1009() -> None:
    async def go() -> None:
        h = Harness()
        try:
            op = await h.handover("s2", "operator")
            dev = await h.handover("s2", "device")
            await op.send(b"x" * (MAX_FRAME + 1))
            _, op_code = await drain_error(op)
            _, dev_code = await drain_error(dev)
            assert (op_code, dev_code) == (1009, 1009)
            report = await h.report()
            assert report["reason"] == f"a message over {MAX_FRAME} bytes (the limit)" and report["to_device"] == 0
        finally:
            h.worker.stop("test over")
            h.close()
            await asyncio.sleep(0.05)  # the dropped connections' callbacks

    run(go())


def test_a_refusal_and_an_admins_end_are_told_to_the_operator() -> None:
    async def go() -> None:
        h = Harness()
        try:
            op = await h.handover("s3", "operator")
            h.send({"op": "fail", "sid": "s3", "status": "refused", "reason": "the device refused: no", "code": 4403})
            messages, code = await drain_error(op)
            assert [json.loads(m)["message"] for m in messages] == ["the device refused: no"] and code == 4403
            assert (await h.report())["status"] == "refused"
            # a device end for a session that is over is dropped
            with pytest.raises(InvalidMessage):  # closed without an answer
                await h.handover("s3", "device")
            op = await h.handover("s4", "operator")
            dev = await h.handover("s4", "device")
            h.send({"op": "end", "sid": "s4", "status": "ended", "reason": "ended by an administrator"})
            messages, _ = await drain_error(op)
            assert [json.loads(m)["message"] for m in messages] == ["ended by an administrator"]
            assert (await h.report())["status"] == "ended"
            _, dev_code = await drain_error(dev)
            assert dev_code == 1000
        finally:
            h.worker.stop("test over")
            h.close()
            await asyncio.sleep(0.05)  # the dropped connections' callbacks

    run(go())


def test_a_device_that_does_not_read_stops_the_operator_being_read() -> None:
    async def go() -> None:
        h = Harness()
        try:
            op = await h.handover("s5", "operator")
            dev = await h.handover("s5", "device")
            dev.transport.pause_reading()  # the device's side stops reading its socket
            session = h.worker.sessions["s5"]
            chunk = b"y" * 65536
            sent = 0
            # the operator keeps sending until the relay stops reading it (its own sends then stall)
            while not session.ends["operator"].blocked & PEER_BUSY:
                await asyncio.wait_for(op.send(chunk), 10)
                sent += len(chunk)
                assert sent < 256 * 1024 * 1024, "the relay kept reading a side whose peer does not read"
            # what the worker holds for the device is bounded by its write buffer (plus one read)
            held = session.ends["device"].transport.get_write_buffer_size()
            assert held <= WRITE_HIGH + 256 * 1024 + len(chunk) * 2, held
            dev.transport.resume_reading()
            got = 0
            while got < session.to_device - 1024 * 1024:  # everything the relay took arrives
                got += len(await asyncio.wait_for(dev.recv(), 10))
            assert not session.ends["operator"].blocked
        finally:
            h.worker.stop("test over")
            h.close()
            await asyncio.sleep(0.05)  # the dropped connections' callbacks

    run(go())


def test_the_server_going_away_closes_every_session() -> None:
    async def go() -> None:
        h = Harness()
        try:
            op = await h.handover("s6", "operator")
            await h.handover("s6", "device")
            h.server_end.close()  # the server process is gone: end of file on the link
            messages, code = await drain_error(op)
            assert [json.loads(m)["message"] for m in messages] == ["the server is stopping"] and code == 1001
            assert h.worker.stopped.done() and h.worker.sessions == {}
        finally:
            h.close()
            await asyncio.sleep(0.05)

    run(go())


def test_an_operator_still_sending_when_the_session_ends_gets_its_reason_and_close_frame() -> None:
    """The relay keeps reading after its close frame: a reset (unread data at close) would
    overtake the reason and the close frame on their way to an operator that is still sending."""
    async def go() -> None:
        h = Harness()
        try:
            for sid in ("s7", "s8", "s9"):
                op = await h.handover(sid, "operator")
                dev = await h.handover(sid, "device")
                dev.transport.pause_reading()  # the device reads nothing: the operator's data piles up
                stop = asyncio.Event()

                async def flood(ws: ClientConnection = op, done: asyncio.Event = stop) -> None:
                    with contextlib.suppress(ConnectionClosed):
                        while not done.is_set():
                            await ws.send(b"z" * 65536)

                pusher = asyncio.create_task(flood())
                await asyncio.sleep(0.3)
                h.send({"op": "end", "sid": sid, "status": "ended", "reason": "ended by an administrator"})
                messages, code = await drain_error(op)
                stop.set()
                await pusher
                assert code == 1000, (sid, code)
                assert [json.loads(m)["message"] for m in messages if isinstance(m, str)] == \
                    ["ended by an administrator"], sid
                assert (await h.report())["status"] == "ended"
                dev.transport.abort()  # it never read: its close handshake cannot finish
        finally:
            h.worker.stop("test over")
            h.close()
            await asyncio.sleep(0.05)  # the dropped connections' callbacks

    run(go())
