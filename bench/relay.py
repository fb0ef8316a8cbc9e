"""Relay benchmark: remote access's port forwarding and terminal through the server's relay (issue 6,
ADR 0016), beside a direct TCP connection and socat in the same run.

What it does, in one run, with one ``corral server`` (SQLite) and one real ``corral agent`` on
loopback, and a target process (uvloop) on the same loopback that the device forwards to: a
*sink* (counts what it receives until EOF, answers with the count), a *source* (sends
``--size`` bytes to whoever connects) and an *echo*.

1. **Throughput.** A forward session driven directly over the operator's WebSocket (the
   ``websockets`` client, in the CLI's 32 KiB messages; no CLI process, no local socket in front
   of it), twice: offering permessage-deflate (as browsers do, and as ``corral forward`` did
   until commit a4dbde0; the relay worker declines it, so both should match), and without
   compression (as ``corral forward`` connects now). ``--size`` MiB to the
   sink (operator → device → target: from the session's request to the sink's count), and from
   the source (target → device → operator: to the device's ``eof``), ``--rounds`` times each,
   the median; the session's opening is inside the time (tens of ms of seconds).
   **References**, interleaved round by round, the same client code on a socket: a direct TCP
   connection to the same sink and source, and ``socat`` relaying TCP → TCP to them (one C relay
   hop; skipped, and said so, when ``socat`` is not installed).
2. **Keystroke echo.** A terminal session (permessage-deflate offered); ``stty raw -echo; exec cat`` in the shell, then
   ``--keys`` keystrokes, one byte each, each timed from the send to its echo (``cat`` writes it
   back on the PTY), 5 ms apart. **Reference**: the same on a local PTY (``/bin/sh``, the same
   command) read and written by the benchmark directly, in alternating halves. The figure is the
   added p99: Corral's p99 − the local PTY's p99.
3. **Idle sessions.** ``--idle`` forward sessions to the echo target, opened 16 at a time, each
   checked with one byte echoed, then left idle; the growth of the resident memory (RSS) of the
   server and of the agent ÷ the sessions, after both are quiet, beside a warm-up of 100 sessions
   opened and closed first (so that what is loaded once is not counted per session). Without
   compression first, then with permessage-deflate on a restarted server (a fresh process: the
   first round's freed memory would be reused). **Reference**: a bare uvicorn with the server's
   settings (``--role floor``) holding the same two WebSockets per session (the operator's as
   the client connects, the device's uncompressed).
4. **Telemetry under load.** ``--telemetry-devices`` more devices (real agents in one process,
   ``bench.ingest``'s timed client) reporting telemetry every 0.1 s; the p99 of their send →
   ``telemetry_ack`` over a ``--window`` without sessions, then the same window while
   ``--busy`` forward sessions on the first agent each push data to the echo target (and read it
   back) as fast as they can (a separate process drives them; with permessage-deflate, then
   without compression), then with each session limited to ``--busy-rate`` KB/s, then without sessions
   again.

Run alone: ``python -m bench.relay [--size 256] [--rounds 3] [--keys 1000] [--idle 1000]
[--busy 100] [--quick]``. The internal ``--role`` modes are the target, load and floor processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pty
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil

from bench.common import (
    PY,
    RESULTS_DIR,
    ROOT,
    CorralServer,
    Figure,
    add_figures,
    bench_main,
    bench_parser,
    cpu_seconds,
    finish,
    free_port,
    new_result,
    percentile,
    raise_nofile,
    rss,
    settle,
    stop_process,
    summarize_ms,
    tail,
    wait_http_ok,
)
from bench.ingest import Client

GOAL_MBS = 50.0
GOAL_ADDED_P99_MS = 2.0
GOAL_KB_PER_SESSION = 20.0
GOAL_TELEMETRY_RATIO = 1.5  # "not delayed": the p99 with the sessions busy within 1.5× of without
MB = 1e6
CHUNK = 32 * 1024  # the CLI's message size (corral.cli.remote.CHUNK)
KEY_GAP = 0.005
TELEMETRY_INTERVAL = 0.1
#: how the processes that stand in for other machines run (the device's agent and its forward
#: targets, the operators' load): at the lowest CPU priority, so that on a 2-core machine the
#: figures show the server (its process and its relay worker) rather than the machine being
#: oversubscribed by the benchmark's own stand-ins. The measuring clients run at normal priority.
STAND_IN = ["nice", "-n", "19"]
#: sessions opened and closed before the idle ones are counted: what is loaded or cached once
#: (the database's page caches, the allocator's pools) is not a cost per session
WARM_SESSIONS = 100
READY_CMD = b"stty raw -echo; echo RE''ADY; exec cat\n"


# --- the target process ------------------------------------------------------------------------


def _target(a: argparse.Namespace) -> int:
    """Sink, source and echo servers on 127.0.0.1; prints their ports as one JSON line."""
    import uvloop

    size = a.size << 20
    block = os.urandom(1 << 20)

    class Sink(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.count = 0

        def data_received(self, data: bytes) -> None:
            self.count += len(data)

        def eof_received(self) -> bool:
            self.transport.write(struct.pack("!Q", self.count))
            return False  # the transport closes once the count is written

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

        def pause_writing(self) -> None:  # the peer does not read: stop reading it too
            self.transport.pause_reading()

        def resume_writing(self) -> None:
            self.transport.resume_reading()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            left = size
            mv = memoryview(block)
            while left > 0:
                n = min(left, len(block))
                writer.write(mv[:n])
                await writer.drain()
                left -= n
            writer.write_eof()
            await reader.read()  # until the peer closes
        writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sink = await loop.create_server(Sink, "127.0.0.1", 0, backlog=4096)
        echo = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
        src = await asyncio.start_server(source, "127.0.0.1", 0, backlog=4096)
        ports = {name: srv.sockets[0].getsockname()[1] for name, srv in
                 (("sink", sink), ("echo", echo), ("source", src))}
        print(json.dumps(ports), flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    raise_nofile()
    uvloop.run(main())
    return 0


# --- the operator's side ------------------------------------------------------------------------


class Operator:
    """Opens sessions as ``corral forward``/``corral terminal`` do: ``POST`` for a token, then the
    session's WebSocket with the token and the user's credentials."""

    def __init__(self, server_url: str, api_token: str, device: str, compression: str | None = "deflate") -> None:
        self.url = server_url
        self.compression = compression
        self.token = api_token
        self.device = device
        self.http = httpx.AsyncClient(base_url=server_url + "/api/v1", timeout=60,
                                      headers={"Authorization": f"Bearer {api_token}"},
                                      limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))

    async def open(self, kind: str, params: dict[str, Any]) -> Any:
        from websockets.asyncio.client import connect

        r = await self.http.post(f"/devices/{self.device}/sessions", json={"kind": kind, "params": params})
        if r.status_code != 201:
            raise RuntimeError(f"POST sessions: {r.status_code} {r.text}")
        doc = r.json()
        url = self.url.replace("http", "ws", 1) + doc["ws_path"] + "?token=" + doc["token"]
        # as corral.cli.remote._connect connects, but for the compression (``compression``)
        return await connect(url, additional_headers={"Authorization": f"Bearer {self.token}"}, max_size=1 << 20,
                             open_timeout=20, ping_interval=20, ping_timeout=20, compression=self.compression)

    async def close(self) -> None:
        await self.http.aclose()


def _control(msg: str) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        doc = json.loads(msg)
        if isinstance(doc, dict):
            return doc
    return {}


async def _push_ws(ws: Any, size: int, rate: float = 0.0, until: float = 0.0) -> int:
    """Send ``size`` bytes (or, with ``until``, until that monotonic time) in CHUNK messages, then
    ``eof``; the sink's count."""
    chunk = os.urandom(CHUNK)
    sent = 0
    t0 = time.monotonic()
    while (sent < size) if not until else (time.monotonic() < until):
        n = min(CHUNK, size - sent) if not until else CHUNK
        await ws.send(chunk if n == CHUNK else chunk[:n])
        sent += n
        if rate:
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
    await ws.send(json.dumps({"type": "eof"}))
    got = b""
    while len(got) < 8:
        msg = await ws.recv()
        if isinstance(msg, bytes):
            got += msg
        elif _control(msg).get("type") == "error":
            raise RuntimeError(f"forward: {msg}")
    count = int(struct.unpack("!Q", got[:8])[0])
    if count != sent:
        raise RuntimeError(f"the sink received {count} bytes of {sent}")
    return count


async def corral_up(op: Operator, port: int, size: int) -> float:
    t0 = time.perf_counter()
    ws = await op.open("forward", {"host": "127.0.0.1", "port": port})
    try:
        await _push_ws(ws, size)
        return time.perf_counter() - t0
    finally:
        await ws.close()


async def corral_down(op: Operator, port: int, size: int) -> float:
    t0 = time.perf_counter()
    ws = await op.open("forward", {"host": "127.0.0.1", "port": port})
    try:
        got = 0
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                got += len(msg)
                continue
            kind = _control(msg).get("type")
            if kind == "eof":
                break
            if kind == "error":
                raise RuntimeError(f"forward: {msg}")
        elapsed = time.perf_counter() - t0
        await ws.send(json.dumps({"type": "eof"}))
        if got != size:
            raise RuntimeError(f"received {got} bytes of {size}")
        return elapsed
    finally:
        await ws.close()


async def tcp_up(port: int, size: int) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = os.urandom(CHUNK)
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        writer.write(chunk if n == CHUNK else chunk[:n])
        await writer.drain()
        sent += n
    writer.write_eof()
    count = struct.unpack("!Q", await reader.readexactly(8))[0]
    elapsed = time.perf_counter() - t0
    writer.close()
    if count != size:
        raise RuntimeError(f"the sink received {count} bytes of {size}")
    return elapsed


async def tcp_down(port: int, size: int) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    got = 0
    while data := await reader.read(1 << 20):
        got += len(data)
    elapsed = time.perf_counter() - t0
    writer.close()
    if got != size:
        raise RuntimeError(f"received {got} bytes of {size}")
    return elapsed


def _socat(target_port: int, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=128",
                                 f"TCP:127.0.0.1:{target_port}"], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc, port
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"socat did not listen on {port}:\n{tail(log)}")


# --- keystroke echo --------------------------------------------------------------------------------


class _Terminal(Protocol):
    """One side of an echo loop: ``send`` one byte, ``recv`` what comes back."""

    async def send(self, data: bytes) -> None: ...

    async def recv(self, timeout: float) -> bytes: ...


async def _ready(term: _Terminal) -> None:
    """``stty raw -echo; exec cat`` typed, its marker waited for, then the output drained."""
    await term.send(READY_CMD)
    got = b""
    deadline = time.monotonic() + 20
    while b"READY" not in got.replace(b"RE''ADY", b""):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the terminal did not get ready: {got[-300:]!r}")
        with contextlib.suppress(TimeoutError):
            got += await term.recv(1.0)
    while True:
        try:
            await term.recv(0.3)
        except TimeoutError:
            return


async def _keystrokes(term: _Terminal, n: int, offset: int) -> list[float]:
    out = []
    for i in range(n):
        key = bytes([97 + (offset + i) % 26])
        t0 = time.perf_counter()
        await term.send(key)
        got = b""
        while key not in got:
            got += await term.recv(10.0)
        out.append(time.perf_counter() - t0)
        if got != key:
            raise RuntimeError(f"echo of {key!r}: got {got!r}")
        await asyncio.sleep(KEY_GAP)
    return out


class WsTerminal:
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float) -> bytes:
        while True:
            msg = await asyncio.wait_for(self.ws.recv(), timeout)
            if isinstance(msg, bytes):
                return bytes(msg)
            if _control(msg).get("type") in ("error", "exit"):
                raise RuntimeError(f"terminal: {msg}")


class LocalPty:
    """``/bin/sh`` on a PTY of the benchmark's own, read when the event loop says readable."""

    def __init__(self) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(["/bin/sh"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color"})
        os.close(slave)
        os.set_blocking(self.master, False)

    async def send(self, data: bytes) -> None:
        os.write(self.master, data)

    async def recv(self, timeout: float) -> bytes:
        with contextlib.suppress(BlockingIOError):
            data = os.read(self.master, 65536)
            if data:
                return data
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        def readable() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(self.master, readable)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            loop.remove_reader(self.master)
        return os.read(self.master, 65536)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        os.close(self.master)


async def keystroke_echo(op: Operator, keys: int) -> tuple[list[float], list[float]]:
    ws = await op.open("terminal", {"cols": 80, "rows": 24})
    local = LocalPty()
    corral_s: list[float] = []
    local_s: list[float] = []
    try:
        remote = WsTerminal(ws)
        await _ready(remote)
        await _ready(local)
        await _keystrokes(remote, 20, 0)  # warm-up
        await _keystrokes(local, 20, 0)
        half = keys // 2
        for part in (half, keys - half):  # alternating halves: drift hits both alike
            local_s += await _keystrokes(local, part, len(local_s))
            corral_s += await _keystrokes(remote, part, len(corral_s))
    finally:
        local.close()
        await ws.close()
    return corral_s, local_s


# --- idle sessions -----------------------------------------------------------------------------------


async def open_idle(op: Operator, port: int, n: int, parallel: int = 16) -> tuple[list[Any], list[float]]:
    sem = asyncio.Semaphore(parallel)
    opened: list[Any] = []
    times: list[float] = []

    async def one() -> None:
        async with sem:
            t0 = time.perf_counter()
            ws = await op.open("forward", {"host": "127.0.0.1", "port": port})
            opened.append(ws)
            await ws.send(b"x")
            while True:
                msg = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(msg, bytes):
                    break
                raise RuntimeError(f"forward: {msg}")
            times.append(time.perf_counter() - t0)

    await asyncio.gather(*(one() for _ in range(n)))
    return opened, times


async def close_all(sockets: list[Any]) -> None:
    sem = asyncio.Semaphore(64)

    async def one(ws: Any) -> None:
        async with sem:
            with contextlib.suppress(Exception):
                await ws.close()

    await asyncio.gather(*(one(ws) for ws in sockets))


async def wait_no_live(op: Operator, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = (await op.http.get("/sessions", params={"live": "true", "limit": 1000})).json()
        if not live:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("sessions still live after they were closed")


# --- the load process: busy sessions -------------------------------------------------------------------


def _load(a: argparse.Namespace) -> int:
    """``--sessions`` forward sessions to the echo target, each pushing data (at ``--rate`` bytes/s each,
    0: as fast as it can) for ``--duration`` seconds; prints ``{"busy"}`` once all are open, then
    ``{"done", "bytes"}``."""
    import uvloop

    async def main() -> None:
        op = Operator(a.server, a.token, a.device, None if a.compression == "none" else a.compression)
        sockets, _ = await open_idle(op, a.echo_port, a.sessions)  # open and checked, as the idle ones
        print(json.dumps({"busy": time.time()}), flush=True)
        until = time.monotonic() + a.duration
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(_push_after_echo(ws, a.rate, until) for ws in sockets))
        print(json.dumps({"done": time.time(), "bytes": sum(counts), "seconds": time.perf_counter() - t0}),
              flush=True)
        await close_all(sockets)
        await op.close()

    raise_nofile()
    uvloop.run(main())
    return 0


async def _push_after_echo(ws: Any, rate: float, until: float) -> int:
    """A session opened to the echo target pushing data: what it sends comes back (read and
    counted as it comes, so both directions are busy); the bytes sent."""
    chunk = os.urandom(CHUNK)
    state = {"sent": 0, "back": 0}

    async def reader() -> None:
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                state["back"] += len(msg)
            elif _control(msg).get("type") in ("eof", "error"):
                return

    r = asyncio.create_task(reader())
    t0 = time.monotonic()
    while time.monotonic() < until:
        await ws.send(chunk)
        state["sent"] += CHUNK
        if rate:
            ahead = state["sent"] / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(min(ahead, max(0.0, until - time.monotonic())))
    await ws.send(json.dumps({"type": "eof"}))
    with contextlib.suppress(TimeoutError, Exception):
        await asyncio.wait_for(r, 30)
    r.cancel()
    return state["sent"] + state["back"]


# --- the floor: a bare uvicorn holding WebSockets --------------------------------------------------


def _floor(a: argparse.Namespace) -> int:
    """A bare ASGI app on uvicorn with the Corral server's settings (uvloop, httptools, the
    ``websockets-sansio`` implementation, its frame limit, no pings, permessage-deflate accepted):
    a WebSocket is accepted and then only read until it closes. ``GET /`` answers 200."""
    import uvicorn
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            ws = WebSocket(scope, receive, send)
            await ws.accept()
            with contextlib.suppress(WebSocketDisconnect):
                while (await ws.receive())["type"] != "websocket.disconnect":
                    pass
        elif scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    raise_nofile()
    uvicorn.run(app, host="127.0.0.1", port=a.port, loop="uvloop", http="httptools", ws="websockets-sansio",
                ws_max_size=1 << 20, ws_ping_interval=None, log_level="warning", lifespan="off", backlog=4096)
    return 0


async def floor_per_session(n: int, compression: str | None, log: Path) -> float:
    """Bytes of RSS per session in a bare uvicorn holding, per session, one WebSocket connected
    as the operator's (``compression``) and one as the device's (never compressed)."""
    from websockets.asyncio.client import connect

    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen([PY, "-m", "bench.relay", "--role", "floor", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/", proc, log)
        url = f"ws://127.0.0.1:{port}/ws"
        sem = asyncio.Semaphore(16)

        async def pairs(k: int) -> list[Any]:
            out: list[Any] = []

            async def one() -> None:
                async with sem:
                    out.append(await connect(url, compression=compression, ping_interval=20, max_size=1 << 20))
                    out.append(await connect(url, compression=None, ping_interval=None, max_size=1 << 20))

            await asyncio.gather(*(one() for _ in range(k)))
            return out

        await close_all(await pairs(10))  # warm-up
        await asyncio.to_thread(settle, proc.pid)
        before = rss(proc.pid)
        held = await pairs(n)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(settle, proc.pid)
        grown = rss(proc.pid) - before
        await close_all(held)
        return grown / n
    finally:
        stop_process(proc)


# --- the driver -----------------------------------------------------------------------------------------


def _relay_worker_pid(server_pid: int) -> int:
    """The server's relay worker (its child process that carries the sessions' bytes)."""
    for child in psutil.Process(server_pid).children():
        if "corral.server.relay_worker" in " ".join(child.cmdline()):
            return int(child.pid)
    raise RuntimeError("the server has no relay worker")


def _wait_device(server: CorralServer, agent: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    with server.client() as c:
        while time.monotonic() < deadline:
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited with {agent.returncode}:\n{tail(log)}")
            items = c.get("/devices", params={"status": "accepted"}).json()["items"]
            online = [d["id"] for d in items if d.get("online")]
            if online:
                return str(online[0])
            time.sleep(0.2)
    raise RuntimeError(f"the agent did not come online:\n{tail(log)}")


class _Proc(Client):
    """A child process speaking JSON lines on stdout (``bench.ingest``'s client, any command)."""

    def __init__(self, args: list[str], log: Path, stdin: bool = False) -> None:
        self.log = log
        with log.open("ab") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                         stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)


def _mbs(size: int, seconds: list[float]) -> float | None:
    return size / MB / statistics.median(seconds) if seconds else None


def run(a: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    size = a.size << 20
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-relay-"))
    params = {"size_mib": a.size, "rounds": a.rounds, "keys": a.keys, "idle": a.idle, "busy": a.busy,
              "busy_rate_kbs": a.busy_rate, "telemetry_devices": a.telemetry_devices, "window_s": a.window}
    result = new_result("relay", "Relay: port forwarding and terminal through the server, beside direct TCP "
                        "and socat", params, a.quick)
    server = CorralServer(tmp / "corral")
    target: _Proc | None = None
    agent: subprocess.Popen[bytes] | None = None
    socats: list[subprocess.Popen[bytes]] = []
    telemetry: _Proc | None = None
    details: dict[str, Any] = {}
    notes: list[str] = result["notes"]
    result["details"] = details
    try:
        server.init()
        server.start()
        target = _Proc([*STAND_IN, PY, "-m", "bench.relay", "--role", "target", "--size", str(a.size)],
                       tmp / "target.log")
        ports = target.read()
        with server.client() as c:
            token = c.post("/enrollment-tokens", json={"description": "bench relay"}).raise_for_status().json()["token"]
        config = tmp / "agent.toml"
        config.write_text("[telemetry]\nenabled = false\n[remote]\nmax_sessions = 8\nidle_timeout = 3600\n")
        agent_log = tmp / "agent.log"
        with agent_log.open("ab") as out:
            agent = subprocess.Popen([*STAND_IN, PY, "-m", "corral", "agent", "--server", server.url, "--state-dir",
                                      str(tmp / "agent"), "--enroll-token", token, "--config", str(config)],
                                     stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "CORRAL_LOG_LEVEL": "WARNING"})
        device = _wait_device(server, agent, agent_log)
        has_socat = shutil.which("socat") is not None
        if has_socat:
            s1, socat_sink = _socat(ports["sink"], tmp / "socat.log")
            s2, socat_source = _socat(ports["source"], tmp / "socat.log")
            socats += [s1, s2]
        else:
            notes.append("socat is not installed: its reference was skipped")

        async def idle_sessions(op: Operator, compression: str | None, with_agent: bool) -> dict[str, Any]:
            """``--idle`` sessions held open: the RSS of the server (and the agent) before and after."""
            assert agent is not None
            op.compression = compression
            deadline = time.monotonic() + 60
            while True:  # warm-up (and, after a restart, until the device is back)
                try:
                    warm, _ = await open_idle(op, ports["echo"], WARM_SESSIONS)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1.0)
            await close_all(warm)
            await wait_no_live(op)
            pids = {"server": server.pid, "relay": _relay_worker_pid(server.pid),
                    **({"agent": agent.pid} if with_agent else {})}
            for pid in pids.values():
                await asyncio.to_thread(settle, pid)
            before = {k: rss(pid) for k, pid in pids.items()}
            t0 = time.perf_counter()
            sockets, open_times = await open_idle(op, ports["echo"], a.idle)
            opened_s = time.perf_counter() - t0
            await asyncio.sleep(2.0)
            for pid in pids.values():
                await asyncio.to_thread(settle, pid)
            after = {k: rss(pid) for k, pid in pids.items()}
            live = (await op.http.get("/sessions", params={"live": "true", "limit": 1000})).json()
            if len(live) != a.idle:
                raise RuntimeError(f"{len(live)} sessions live of {a.idle}")
            await close_all(sockets)
            await wait_no_live(op)
            return {"rss_before": before, "rss_after": after, "open_ms": summarize_ms(open_times),
                    "opened_in_s": round(opened_s, 2)}

        async def measure() -> None:
            op = Operator(server.url, server.token, device)
            try:
                # 1. throughput, interleaved round by round
                runs: dict[str, list[float]] = {f"{k}_{way}": [] for way in ("up", "down")
                                                for k in ("corral", "plain", "tcp", "socat")}
                plain = Operator(server.url, server.token, device, None)
                await corral_up(op, ports["sink"], min(size, 8 << 20))  # warm-up: the agent loads its forward
                await tcp_up(ports["sink"], min(size, 8 << 20))
                for _ in range(a.rounds):
                    runs["corral_up"].append(await corral_up(op, ports["sink"], size))
                    runs["plain_up"].append(await corral_up(plain, ports["sink"], size))
                    runs["tcp_up"].append(await tcp_up(ports["sink"], size))
                    if has_socat:
                        runs["socat_up"].append(await tcp_up(socat_sink, size))
                    runs["corral_down"].append(await corral_down(op, ports["source"], size))
                    runs["plain_down"].append(await corral_down(plain, ports["source"], size))
                    runs["tcp_down"].append(await tcp_down(ports["source"], size))
                    if has_socat:
                        runs["socat_down"].append(await tcp_down(socat_source, size))
                await plain.close()
                details["throughput_s"] = runs
                print(f"relay: throughput: {', '.join(f'{k} {_mbs(size, v) or 0:.0f} MB/s' for k, v in runs.items())}",
                      flush=True)
                # 2. keystroke echo
                corral_keys, local_keys = await keystroke_echo(op, a.keys)
                details["keystroke_echo_ms"] = {"corral": summarize_ms(corral_keys),
                                                "local_pty": summarize_ms(local_keys)}
                print(f"relay: keystroke echo p99 {percentile(corral_keys, 99) * 1000:.2f} ms "
                      f"(local PTY {percentile(local_keys, 99) * 1000:.2f} ms)", flush=True)
                # 3. idle sessions: without compression, then (a fresh server) with permessage-deflate
                details["idle"] = {"plain": await idle_sessions(op, None, True)}
            finally:
                await op.close()
            server.stop()
            server.start()
            assert agent is not None
            await asyncio.to_thread(_wait_device, server, agent, agent_log)
            op = Operator(server.url, server.token, device)
            try:
                details["idle"]["deflate"] = await idle_sessions(op, "deflate", False)
                for mode in ("plain", "deflate"):
                    details["idle"][mode]["floor_bytes_per_session"] = await floor_per_session(
                        a.idle, None if mode == "plain" else mode, tmp / "floor.log")
                print(f"relay: idle sessions: {details['idle']}", flush=True)
            finally:
                await op.close()

        import uvloop

        uvloop.run(measure())

        # 4. telemetry of other devices, without and with busy sessions
        telemetry = _Proc([PY, "-m", "bench.ingest", "--role", "agents", "--server", server.url, "--token", token,
                           "--agents", str(a.telemetry_devices), "--index", "0", "--clients", "1", "--state-dir",
                           str(tmp / "telemetry"), "--seed", "7", "--interval", "10", "--app-metrics", "0"],
                          tmp / "telemetry.log", stdin=True)
        telemetry.read()  # started
        telemetry.read()  # ready
        telemetry.ask(f"interval {TELEMETRY_INTERVAL}")
        time.sleep(3.0)  # warm-up
        windows: dict[str, Any] = {}

        def window(name: str, load: _Proc | None) -> None:
            assert agent is not None
            c0, a0 = cpu_seconds(server.pid), cpu_seconds(agent.pid)
            t0 = time.time()
            time.sleep(a.window)
            t1 = time.time()
            cpu = {"server_pct": round((cpu_seconds(server.pid) - c0) / (t1 - t0) * 100, 1),
                   "agent_pct": round((cpu_seconds(agent.pid) - a0) / (t1 - t0) * 100, 1)}
            assert telemetry is not None
            rep = telemetry.ask(f"report {t0} {t1}")
            lat = [x / 1000 for x in rep["lat_ms"]]
            windows[name] = {"ack_ms": summarize_ms(lat), "batches": rep["batches"], "cpu": cpu,
                             "load_average": [round(x, 2) for x in os.getloadavg()]}
            if load is not None:
                done = load.read()
                windows[name]["relayed_mb_per_s"] = round(done["bytes"] / MB / done["seconds"], 1)
                load.stop()
            print(f"relay: telemetry ({name}): ack p99 {windows[name]['ack_ms'].get('p99', 0):.1f} ms, "
                  f"{rep['batches']} batches, {windows[name]}", flush=True)

        def busy(rate_kbs: float, compression: str = "deflate") -> _Proc:
            load = _Proc([*STAND_IN, PY, "-m", "bench.relay", "--role", "load", "--server", server.url,
                          "--token", server.token,
                          "--device", device, "--echo-port", str(ports["echo"]), "--sessions", str(a.busy),
                          "--rate", str(rate_kbs * 1000), "--duration", str(a.window + 2),
                          "--compression", compression], tmp / "load.log")
            load.read()  # busy: all open
            time.sleep(1.0)
            return load

        window("idle", None)
        window("busy", busy(0))
        window("busy_plain", busy(0, "none"))
        window("busy_rate", busy(a.busy_rate))
        window("idle_after", None)
        details["telemetry"] = windows
        details["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        _figures(result, a, size, has_socat)
    finally:
        if telemetry is not None:
            telemetry.stop()
        for s in socats:
            stop_process(s)
        if agent is not None:
            stop_process(agent)
        if target is not None:
            target.stop()
        server.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _figures(result: dict[str, Any], a: argparse.Namespace, size: int, has_socat: bool) -> None:
    d = result["details"]
    runs = d["throughput_s"]
    figs: list[Figure] = []
    notes: list[str] = result["notes"]
    for way, label in (("up", "operator → device's target"), ("down", "device's target → operator")):
        tcp = _mbs(size, runs[f"tcp_{way}"])
        for key, how in (("corral", "operator's WebSocket with permessage-deflate"),
                         ("plain", "without compression, as `corral forward` connects")):
            mbs = _mbs(size, runs[f"{key}_{way}"])
            figs.append(Figure(f"forward throughput, {label}, {how}", mbs, "MB/s", reference=tcp,
                               goal=f"≥ {GOAL_MBS:.0f} MB/s", met=mbs is not None and mbs >= GOAL_MBS, better="higher",
                               note=f"median of {a.rounds}, {a.size} MiB; reference: direct TCP"))
        if has_socat:
            socat = _mbs(size, runs[f"socat_{way}"])
            figs.append(Figure(f"socat TCP relay, {label}", socat, "MB/s", reference=tcp, better="higher",
                               note="reference: direct TCP"))
            for key, how in (("corral", "with permessage-deflate"), ("plain", "without compression")):
                mbs = _mbs(size, runs[f"{key}_{way}"])
                if mbs and socat:
                    notes.append(f"forward {label}, {how}: {mbs / socat:.2f}× socat's throughput "
                                 f"({mbs:.0f} vs {socat:.0f} MB/s)")
    k = d["keystroke_echo_ms"]
    figs.append(Figure("keystroke echo p50", k["corral"]["p50"], "ms", reference=k["local_pty"]["p50"],
                       note="reference: a local PTY"))
    figs.append(Figure("keystroke echo p99", k["corral"]["p99"], "ms", reference=k["local_pty"]["p99"],
                       note="reference: a local PTY"))
    added = k["corral"]["p99"] - k["local_pty"]["p99"]
    figs.append(Figure("keystroke echo p99, added", added, "ms", goal=f"< {GOAL_ADDED_P99_MS:.0f} ms",
                       met=added < GOAL_ADDED_P99_MS, note=f"{a.keys} keystrokes, Corral − local PTY"))
    idle = d["idle"]

    def per_session(mode: str, proc: str) -> float:
        """KB per session of the agent, or of the server: its own process and its relay worker."""
        m = idle[mode]
        procs = [proc, "relay"] if proc == "server" and "relay" in m["rss_after"] else [proc]
        return float(sum(m["rss_after"][x] - m["rss_before"][x] for x in procs) / a.idle / 1000)

    for mode, how in (("deflate", "operator's WebSocket with permessage-deflate"),
                      ("plain", "without compression, as the CLI connects")):
        kb = per_session(mode, "server")
        figs.append(Figure(f"memory per idle session, server, {how}", kb, "KB",
                           reference=idle[mode]["floor_bytes_per_session"] / 1000,
                           goal=f"< {GOAL_KB_PER_SESSION:.0f} KB", met=kb < GOAL_KB_PER_SESSION,
                           note=f"RSS growth ÷ {a.idle} forward sessions; reference: a bare uvicorn holding the "
                                "same two WebSockets per session"))
    kb = per_session("plain", "agent")
    figs.append(Figure("memory per idle session, agent", kb, "KB", goal=f"< {GOAL_KB_PER_SESSION:.0f} KB",
                       met=kb < GOAL_KB_PER_SESSION, note=f"RSS growth ÷ {a.idle} forward sessions"))
    figs.append(Figure("session open, p50", idle["deflate"]["open_ms"]["p50"], "ms",
                       note="POST → WebSocket → device connected → first byte echoed, 16 at a time"))
    t = d["telemetry"]
    base = t["idle"]["ack_ms"].get("p99")
    for name, label in (("busy", f"{a.busy} sessions busy at full speed, with permessage-deflate"),
                        ("busy_plain", f"{a.busy} sessions busy at full speed, without compression (as the CLI)"),
                        ("busy_rate", f"{a.busy} sessions at {a.busy_rate:g} KB/s each, with permessage-deflate")):
        p99 = t[name]["ack_ms"].get("p99")
        figs.append(Figure(f"other devices' telemetry ack p99, {label}", p99, "ms", reference=base,
                           goal=f"≤ {GOAL_TELEMETRY_RATIO:g}× without sessions",
                           met=p99 is not None and base is not None and p99 <= GOAL_TELEMETRY_RATIO * base,
                           note=f"reference: no sessions; {t[name].get('relayed_mb_per_s', 0):.0f} MB/s relayed, "
                                f"server CPU {t[name]['cpu']['server_pct']:.0f} %"))
    add_figures(result, *figs)
    capped = [f"{way} {cli:.0f} vs {plain:.0f} MB/s" for way in ("up", "down")
              if (cli := _mbs(size, runs[f"corral_{way}"])) and (plain := _mbs(size, runs[f"plain_{way}"]))
              and cli < plain / 2]
    if capped:
        notes.append(f"Compression caps the forward (offering permessage-deflate vs not: {'; '.join(capped)}): the "
                     "relay worker is meant to decline permessage-deflate (ADR 0016), so this is a regression.")
    for mode in ("plain", "deflate"):
        kb, floor = per_session(mode, "server"), idle[mode]["floor_bytes_per_session"] / 1000
        if floor >= GOAL_KB_PER_SESSION:
            notes.append(f"Server memory ({'without compression' if mode == 'plain' else 'offering permessage-deflate'}"
                         f"): a bare uvicorn holding the same two WebSockets per session costs {floor:.0f} KB a "
                         f"session; Corral's server process and relay worker together {kb:.0f} KB.")
    for name in ("busy", "busy_plain", "busy_rate"):
        w, base_n = t[name], t["idle"]["batches"]
        if w["batches"] < base_n / 2:
            notes.append(f"Telemetry during `{name}`: only {w['batches']} batches were acked in the window (against "
                         f"{base_n} without sessions): the other devices' telemetry stalled while the relay was busy. "
                         "The relay worker exists to prevent exactly this (ADR 0016): look for sessions relayed in "
                         "the server's own process.")
    result["method"] = (
        "One `corral server` (SQLite) and one real `corral agent` on loopback; the forward targets (a sink that "
        "answers with the byte count at EOF, a source, an echo) in a uvloop process of their own on the same "
        "loopback. **Throughput**: a forward session driven directly over the operator's WebSocket (the "
        "`websockets` client, 32 KiB messages, no CLI process): once offering permessage-deflate (as browsers "
        "do, and the CLI did until commit a4dbde0; the relay worker declines it), once without compression (as "
        "`corral forward` connects now); "
        f"{a.size} MiB to the sink and from the source, the session's opening included; references interleaved "
        "round by round with the same client code on a socket: a direct TCP connection to the same targets, and "
        "`socat` relaying TCP → TCP (one C hop). **Keystroke echo**: a terminal session (permessage-deflate) "
        f"running `stty raw -echo; exec cat`, {a.keys} one-byte keystrokes 5 ms apart, each timed from the send "
        "to its echo; reference: the same command on a local PTY driven by the benchmark, in alternating halves. "
        f"**Idle sessions**: {a.idle} forward sessions to the echo target opened 16 at a time, each checked with "
        "one echoed byte, then idle; the RSS growth of the server (its process and its relay worker) and of the "
        f"agent ÷ the sessions once both are quiet (after {WARM_SESSIONS} warm-up sessions opened and closed): first "
        "without compression, then, on a freshly restarted server (freed memory would otherwise be reused), "
        "offering permessage-deflate. Reference: a bare "
        "uvicorn (the server's settings, a plain ASGI app) holding the same two WebSockets per session. The 20 KB "
        "goal is held to the server and to the agent, each on its own. "
        f"**Telemetry**: {a.telemetry_devices} more devices (real agents in one process) reporting every "
        f"{TELEMETRY_INTERVAL:g} s; the p99 of send → `telemetry_ack` over {a.window:g} s without sessions, then "
        f"with {a.busy} forward sessions on the first agent each pushing 32 KiB messages to the echo target and "
        f"reading them back (as fast as they can, with permessage-deflate and without compression; then at "
        f"{a.busy_rate:g} KB/s each), driven by a separate process. All on one machine: the load generator, the "
        "target, the server, both agents and the benchmark share its CPUs; the device's agent, the forward targets and "
        "the load generator stand in for other machines and run at nice 19 (the server's relay worker runs at "
        "nice 10 by design, ADR 0016; the server's process, the telemetry devices and the measuring client at 0).")


def _parser() -> argparse.ArgumentParser:
    ap = bench_parser("relay", __doc__ or "", "16 MiB, 1 round, 200 keystrokes, 50 idle and 10 busy sessions, 5 s "
                      "windows")
    ap.add_argument("--size", type=int, default=256, help="MiB each way per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", type=int, default=1000, help="keystrokes")
    ap.add_argument("--idle", type=int, default=1000, help="idle sessions")
    ap.add_argument("--busy", type=int, default=100, help="busy sessions beside the telemetry")
    ap.add_argument("--busy-rate", type=float, default=100.0, help="KB/s per busy session, second level")
    ap.add_argument("--telemetry-devices", type=int, default=10)
    ap.add_argument("--window", type=float, default=15.0, help="seconds per telemetry window")
    ap.add_argument("--rerender", action="store_true", help="recompute the figures of the saved result, re-render")
    ap.add_argument("--role", choices=["target", "load", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--echo-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sessions", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--compression", default="deflate", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return ap


def main_result(argv: list[str] | None = None) -> dict[str, Any]:
    a = _parser().parse_args(argv)
    if a.quick:
        a.size, a.rounds, a.keys, a.idle = min(a.size, 16), 1, min(a.keys, 200), min(a.idle, 50)
        a.busy, a.telemetry_devices, a.window = min(a.busy, 10), min(a.telemetry_devices, 2), min(a.window, 5.0)
    return run(a)


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    if a.role == "target":
        sys.exit(_target(a))
    if a.role == "load":
        sys.exit(_load(a))
    if a.role == "floor":
        sys.exit(_floor(a))
    if a.rerender:
        rerender(a.quick, not a.no_docs)
        return
    bench_main(_parser(), main_result, argv)


def rerender(quick: bool, docs: bool) -> None:
    """The figures, notes and method of the saved result computed again from its details."""
    result = json.loads((RESULTS_DIR / f"relay{'-quick' if quick else ''}.json").read_text())
    p = result["params"]
    a = argparse.Namespace(size=p["size_mib"], rounds=p["rounds"], keys=p["keys"], idle=p["idle"], busy=p["busy"],
                           busy_rate=p["busy_rate_kbs"], telemetry_devices=p["telemetry_devices"],
                           window=p["window_s"])
    result["figures"], result["notes"] = [], []
    _figures(result, a, a.size << 20, bool(result["details"]["throughput_s"].get("socat_up")))
    finish(result, docs=docs)


if __name__ == "__main__":
    main()
