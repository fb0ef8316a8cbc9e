"""Remote access under load (issue 6): a hundred sessions relaying as fast as they can are carried
by the relay worker, outside the server process whose event loop serves devices, so other
devices' telemetry keeps being stored and acked meanwhile; and the relay worker dying ends its
sessions with a clear message and is replaced.

No timings are asserted (the machines are shared): what is checked is where the sessions'
sockets live, that every telemetry batch sent while every session moved data was acked and
stored, and what the operators are told. ``bench/relay`` measures the latencies."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from corral import protocol as p
from tests.conftest import AgentProc, ServerProc, start_agent, wait_until
from tests.integration.test_telemetry_server import Device, now_ms, series

SESSIONS = 100
CHUNK = 32 * 1024


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on loopback (the device's forward target), in a thread of its own."""
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    done = asyncio.Event()

    async def serve() -> None:
        server = await asyncio.start_server(echo, sock=sock)
        async with server:
            await done.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    loop.call_soon_threadsafe(done.set)
    thread.join(10)
    loop.close()


@pytest.fixture
def device(server: ServerProc, tmp_path: Path, agents: list[AgentProc]) -> str:
    config = tmp_path / "agent.toml"
    config.write_text("[telemetry]\nenabled = false\n")
    agent = start_agent(server, tmp_path / "agent", server.create_enrollment_token(), "--config", str(config))
    agents.append(agent)
    dev = agent.wait_device_id()
    wait_until(lambda: server.api("GET", f"/devices/{dev}").json().get("online"), what="the agent online")
    return dev


async def open_forward(http: httpx.AsyncClient, s: ServerProc, dev: str, port: int) -> Any:
    r = await http.post(f"/devices/{dev}/sessions", json={"kind": "forward", "params": {"host": "127.0.0.1",
                                                                                          "port": port}})
    assert r.status_code == 201, r.text
    doc = r.json()
    url = s.url.replace("http", "ws", 1) + doc["ws_path"] + "?token=" + doc["token"]
    return await connect(url, additional_headers={"Authorization": f"Bearer {s.admin_token}"}, open_timeout=30,
                         compression=None, max_size=None)


def relay_workers(server: ServerProc) -> list[psutil.Process]:
    return [c for c in psutil.Process(server.proc.pid).children()
            if "corral.server.relay_worker" in " ".join(c.cmdline())]


def relay_worker(server: ServerProc) -> psutil.Process:
    workers = relay_workers(server)
    assert len(workers) == 1, workers
    return workers[0]


def established(proc: psutil.Process) -> int:
    return sum(1 for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED)


def test_a_hundred_busy_sessions_do_not_hold_up_other_devices_telemetry(server: ServerProc, device: str,
                                                                       echo_port: int) -> None:
    s = server
    main = psutil.Process(s.proc.pid)
    before = established(main)

    async def go() -> tuple[list[p.TelemetryAck], list[int], list[int], int, int]:
        async with httpx.AsyncClient(base_url=s.url + "/api/v1", timeout=30,
                                     headers={"Authorization": f"Bearer {s.admin_token}"}) as http:
            gate = asyncio.Semaphore(16)

            async def one() -> Any:
                async with gate:
                    return await open_forward(http, s, device, echo_port)

            sockets = await asyncio.gather(*(one() for _ in range(SESSIONS)))
        moved = [0] * SESSIONS
        stop = asyncio.Event()
        chunk = bytes(range(256)) * (CHUNK // 256)

        async def push(i: int, ws: Any) -> None:
            async def back() -> None:
                async for msg in ws:
                    if isinstance(msg, bytes):
                        moved[i] += len(msg)

            reader = asyncio.create_task(back())
            while not stop.is_set():
                await ws.send(chunk)
                await asyncio.sleep(0)
            await ws.close()
            await asyncio.gather(reader, return_exceptions=True)

        pushers = [asyncio.create_task(push(i, ws)) for i, ws in enumerate(sockets)]
        # every session is moving data before the telemetry starts
        while min(moved) == 0:
            await asyncio.sleep(0.05)
        in_worker, in_main = established(relay_worker(s)), established(main)
        at_start = list(moved)
        acks = []
        async with Device(s, s.create_enrollment_token()) as d:
            base = now_ms()
            seq = 0
            # telemetry until every session has moved more data meanwhile (and at least 20 batches)
            while seq < 20 or any(m <= b for b, m in zip(at_start, moved, strict=True)):
                seq += 1
                batch = p.Telemetry(seq=seq, series=[series("load.probe", [(base + seq, float(seq))])])
                acks.append(await d.send(batch))
        at_end = list(moved)
        stop.set()
        await asyncio.gather(*pushers, return_exceptions=True)
        return acks, at_start, at_end, in_worker, in_main

    acks, at_start, at_end, in_worker, in_main = asyncio.run(go())
    # the sessions' sockets are the relay worker's: the server's own process holds none of them
    assert in_worker >= 2 * SESSIONS, in_worker
    assert in_main < before + 20, (before, in_main)
    # every batch was stored and acked while every session kept moving data
    assert [(a.seq, a.rejected) for a in acks] == [(i, 0) for i in range(1, len(acks) + 1)]
    assert len(acks) >= 20 and all(e > b for b, e in zip(at_start, at_end, strict=True))
    wait_until(lambda: len(s.api("GET", "/sessions", params={"live": "true", "limit": 1000}).json()) == 0,
               timeout=60, what="every session closed")
    closed = s.api("GET", "/sessions", params={"limit": 1000}).json()
    assert len(closed) == SESSIONS and all(x["status"] == "closed" and x["bytes_to_device"] > 0 for x in closed)


def test_the_relay_worker_dying_ends_its_sessions_clearly_and_a_new_one_takes_over(
        server: ServerProc, device: str, echo_port: int) -> None:
    s = server
    worker = relay_worker(s)

    async def session_then_kill() -> list[Any]:
        async with httpx.AsyncClient(base_url=s.url + "/api/v1", timeout=30,
                                     headers={"Authorization": f"Bearer {s.admin_token}"}) as http:
            ws = await open_forward(http, s, device, echo_port)
        await ws.send(b"ping")
        assert await asyncio.wait_for(ws.recv(), 15) == b"ping"
        worker.send_signal(signal.SIGKILL)
        messages = []
        try:
            while True:
                messages.append(await asyncio.wait_for(ws.recv(), 15))
        except ConnectionClosed:
            pass
        return messages

    messages = asyncio.run(session_then_kill())
    assert messages == [], messages  # the worker is gone: the socket closes (the record says why)
    wait_until(lambda: s.api("GET", "/sessions").json()[0]["status"] == "closed", what="the session closed")
    latest = s.api("GET", "/sessions").json()[0]
    assert latest["reason"] == "the relay worker stopped unexpectedly", latest
    # a new worker carries the next session
    wait_until(lambda: [w.pid for w in relay_workers(s)] not in ([], [worker.pid]), what="a new relay worker")

    async def again() -> bytes:
        async with httpx.AsyncClient(base_url=s.url + "/api/v1", timeout=30,
                                     headers={"Authorization": f"Bearer {s.admin_token}"}) as http:
            ws = await open_forward(http, s, device, echo_port)
        await ws.send(b"again")
        data = await asyncio.wait_for(ws.recv(), 15)
        await ws.close()
        return bytes(data) if isinstance(data, bytes) else data.encode()

    assert asyncio.run(again()) == b"again"
    audit = s.api("GET", "/audit", params={"limit": 200}).json()["items"]
    reasons = [e["detail"].get("reason") for e in audit if e["action"] == "session.close"]
    assert reasons.count("the relay worker stopped unexpectedly") == 1 and len(reasons) == 2, reasons
