"""Connections benchmark: N simulated agents on one server process, beside a bare WebSocket server.

What it does, in one run:

1. **Identities.** Writes N device keys into K state dirs (one per client process), so the
   timed part starts with keys on disk, as on a fleet that already exists.
2. **Reference: a bare ``websockets`` server** (``websockets.asyncio.server`` on uvloop, no
   compression, no pings; a subprocess) takes the same N connections from K client processes
   using the same client library the agent uses. Each client answers every frame by echoing it.
   Measured: connect rate, server RSS per connection, a relayed round trip (control socket →
   server → one device socket → echo → server → control, sequential, one sample per device of a
   random sample) and a broadcast (one frame to all N sockets, until every echo is back).
3. **Corral**: ``corral server`` (a subprocess, SQLite) and K client processes each running
   ``corral.sim.runner.run_sim`` (N/K real agents on one event loop) with an enrollment token.
   Measured: connect rate (enrollment included: the devices are new), server RSS per
   connection, the round trip of ``POST /api/v1/devices/{id}/commands {"name": "ping",
   "wait": 5}`` (REST → hub → device → result → REST) for a random sample of devices one at a
   time, and the fan-out of one ``ping`` to all N devices (one ``POST /api/v1/commands`` with
   all the device ids, until every command is ``succeeded``: the last result's ``updated_at`` as
   the server stored it).

Both fleets connect **closed-loop**: a client starts its next device when fewer than
``--in-flight``/K of its started devices are still connecting (``run_sim``'s ``max_connecting``),
so the rate measured is what the server can take. (``--open-loop-rate R`` starts the agents as a
Poisson process at R/s instead; above the server's capacity the backlog can outgrow the agents'
10 s handshake timeout and turn into retries, which is worth knowing but not a rate.)

RSS per connection = (server RSS with N connected, after the server went idle − RSS before the
first client) / N, the same way for both servers.

Run alone: ``python -m bench.connections [--devices 10000] [--clients 2] [--quick]``. The
internal ``--role`` modes are the subprocesses it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    CorralServer,
    Figure,
    add_figures,
    cpu_seconds,
    finish,
    free_port,
    new_result,
    raise_nofile,
    rss,
    settle,
    stop_process,
    summarize_ms,
    tail,
)

RTT_GOAL_MS = 50.0
MEMORY_GOAL_RATIO = 2.0
DEVICES_GOAL = 10_000
#: what `make bench` runs. 10,000 takes ~10 min alone on the 2-CPU reference machine (the fan-out
#: runs at ~45-55 commands/s, connecting at ~70/s); 5,000 keeps all of `make bench` near 5 min.
DEFAULT_DEVICES = 5_000
PAYLOAD = 80  # bytes in a reference frame, about a msgpack `command` envelope


# --- shared ---------------------------------------------------------------------------------------


def _loop_runner() -> asyncio.Runner:
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        return asyncio.Runner()


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _spread(n: int, k: int) -> list[int]:
    """``n`` split into ``k`` near-equal shares."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def prepare_identities(state_dir: Path, n: int) -> None:
    """Device keys in ``state_dir/sim-NNNN/device.key`` as the agent writes them (PKCS#8 PEM,
    0600 in a 0700 dir), without the agent's per-file fsyncs: this is set-up, not measured."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from corral.agent.platform.sim import sim_hostname

    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for i in range(n):
        d = state_dir / sim_hostname(i)
        d.mkdir(mode=0o700, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd = os.open(d / "device.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([PY, "-m", "bench.connections", *args], stdout=subprocess.PIPE, stderr=out,
                                cwd=Path(__file__).resolve().parent.parent)


def _started_at(procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> float:
    """Each client prints ``{"started": epoch}`` once its imports are done; the earliest counts."""
    times = []
    for p, log in zip(procs, logs, strict=True):
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"client exited before starting:\n{tail(log)}")
        times.append(float(json.loads(line)["started"]))
    return min(times)


def _wait_connected(count: Any, n: int, t_start: float, timeout: float, alive: Any
                    ) -> tuple[float | None, list[tuple[float, int]]]:
    """Poll ``count()`` until it reaches ``n``; returns (seconds from ``t_start`` to all
    connected or None on timeout, the timeline of (seconds, connected))."""
    timeline: list[tuple[float, int]] = []
    deadline = time.time() + timeout
    last = -1
    while time.time() < deadline:
        alive()
        try:
            c = count()
        except Exception as exc:  # a busy server may answer a poll late: poll again
            print(f"connections: count poll failed ({type(exc).__name__}); retrying", file=sys.stderr)
            time.sleep(1.0)
            continue
        now = time.time()
        if c != last:
            timeline.append((round(now - t_start, 3), c))
            last = c
        if c >= n:
            return now - t_start, timeline
        time.sleep(0.2)
    return None, timeline


def _ramp_rate(timeline: list[tuple[float, int]], n: int) -> float | None:
    """Connections per second between 10 % and 90 % of ``n`` (the steady part of the ramp)."""
    t10 = next((t for t, c in timeline if c >= 0.1 * n), None)
    t90 = next((t for t, c in timeline if c >= 0.9 * n), None)
    if t10 is None or t90 is None or t90 <= t10:
        return None
    return 0.8 * n / (t90 - t10)


# --- the reference: a bare websockets server and its clients --------------------------------------


async def _ref_server(port: int) -> None:
    """Holds device sockets; a control socket asks it to count, relay a ping, or broadcast."""
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed
    from websockets.typing import Subprotocol

    conns: dict[int, Any] = {}
    control: list[Any] = []
    remaining = [0]

    async def handler(ws: Any) -> None:
        hello = await ws.recv()
        if hello == "control":
            control.append(ws)
            async for msg in ws:
                cmd, _, arg = msg.partition(" ")
                if cmd == "count":
                    await ws.send(f"count {len(conns)}")
                elif cmd == "ping":  # relay one frame to device `arg`; its echo is relayed back
                    await conns[int(arg)].send(b"p" + arg.encode().ljust(PAYLOAD - 1, b"."))
                elif cmd == "all":
                    remaining[0] = len(conns)
                    frame = b"a".ljust(PAYLOAD, b".")
                    for c in list(conns.values()):
                        with contextlib.suppress(ConnectionClosed):
                            await c.send(frame)
            return
        i = int(hello)
        conns[i] = ws
        try:
            async for msg in ws:
                if msg[:1] == b"p":
                    await control[0].send(msg)
                elif msg[:1] == b"a":
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        await control[0].send("done")
        finally:
            conns.pop(i, None)

    stop = _stop_event()
    async with serve(handler, "127.0.0.1", port, subprotocols=[Subprotocol("corral.v1")], compression=None,
                     ping_interval=None, max_size=1 << 20, backlog=4096):
        print(json.dumps({"listening": port}), flush=True)
        await stop.wait()


async def _ref_client(url: str, n: int, offset: int, in_flight: int) -> None:
    """``n`` sockets, at most ``in_flight`` of them opening at a time (as the Corral clients);
    each echoes every frame it receives."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed
    from websockets.typing import Subprotocol

    stop = _stop_event()
    gate = asyncio.Semaphore(in_flight)
    failed = [0]

    async def device(i: int) -> None:
        opened = False
        try:
            async with connect(url, subprotocols=[Subprotocol("corral.v1")], compression=None,
                               ping_interval=None, max_size=1 << 20, open_timeout=30) as ws:
                await ws.send(str(i))
                gate.release()
                opened = True
                async for msg in ws:
                    await ws.send(msg)
        except (ConnectionClosed, OSError, TimeoutError):
            failed[0] += 1
        finally:
            if not opened:
                gate.release()

    print(json.dumps({"started": time.time()}), flush=True)
    tasks = []
    for i in range(n):
        await gate.acquire()
        if stop.is_set():
            break
        tasks.append(asyncio.create_task(device(offset + i)))
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"ref client: {failed[0]} sockets failed", file=sys.stderr, flush=True)


def run_reference(tmp: Path, n: int, clients: int, in_flight: int, sample: list[int], timeout: float
                  ) -> dict[str, Any]:
    from websockets.sync.client import connect
    from websockets.typing import Subprotocol

    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    srv = _spawn(["--role", "ref-server", "--port", str(port)], tmp / "ref-server.log")
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {}
    try:
        assert srv.stdout is not None
        if not srv.stdout.readline():
            raise RuntimeError(f"reference server did not start:\n{tail(tmp / 'ref-server.log')}")
        with connect(url, max_size=1 << 20, open_timeout=30, compression=None,
                     subprotocols=[Subprotocol("corral.v1")]) as ctl:
            ctl.send("control")

            def count() -> int:
                ctl.send("count")
                return int(ctl.recv(timeout=30).split()[1])

            count()
            time.sleep(1.0)
            rss0 = rss(srv.pid)
            logs = [tmp / f"ref-client-{k}.log" for k in range(clients)]
            offset = 0
            for k, share in enumerate(_spread(n, clients)):
                procs.append(_spawn(["--role", "ref-client", "--url", url, "--devices", str(share), "--offset",
                                     str(offset), "--in-flight", str(max(1, in_flight // clients))], logs[k]))
                offset += share
            t_start = _started_at(procs, logs)

            def alive() -> None:
                if srv.poll() is not None:
                    raise RuntimeError(f"reference server died:\n{tail(tmp / 'ref-server.log')}")

            took, timeline = _wait_connected(count, n, t_start, timeout, alive)
            connected = count()
            settle(srv.pid)
            rss1 = rss(srv.pid)
            out.update(connected=connected, connect_s=took, timeline=timeline[::max(1, len(timeline) // 50)],
                       connect_rate=(connected / took) if took else None, ramp_rate=_ramp_rate(timeline, n),
                       rss_before=rss0, rss_after=rss1, rss_per_conn=(rss1 - rss0) / max(connected, 1))
            # relayed round trip, one device at a time
            for i in sample[:10]:  # warm-up
                ctl.send(f"ping {i}")
                ctl.recv(timeout=30)
            rtts = []
            for i in sample:
                t0 = time.perf_counter()
                ctl.send(f"ping {i}")
                ctl.recv(timeout=30)
                rtts.append(time.perf_counter() - t0)
            out["rtt_ms"] = summarize_ms(rtts)
            out["rtt_samples_ms"] = [round(x * 1000, 3) for x in rtts]
            # broadcast to all, until every echo is back
            bcast = []
            for _ in range(3):
                t0 = time.perf_counter()
                ctl.send("all")
                ctl.recv(timeout=120)
                bcast.append(time.perf_counter() - t0)
            out["broadcast_s"] = sorted(bcast)[1]
            out["broadcast_runs_s"] = bcast
    finally:
        for p in procs:
            stop_process(p)
        stop_process(srv)
    return out


# --- Corral ---------------------------------------------------------------------------------------


def _sim_client(a: argparse.Namespace) -> int:
    """``corral sim`` in a client process: ``run_sim`` with N/K devices, closed-loop (at most
    ``--in-flight`` still connecting) or, with ``--in-flight 0``, open-loop at ``--start-rate``."""
    from corral.agent.main import run_until_signalled, setup_logging
    from corral.sim.runner import run_sim

    setup_logging("warning")
    raise_nofile()
    print(json.dumps({"started": time.time()}), flush=True)
    rate = a.start_rate if a.in_flight == 0 else 1e6  # closed loop: the gate sets the pace
    return run_until_signalled(lambda stop: run_sim(
        a.server, [a.token], a.devices, Path(a.state_dir), ["rpi4", "imx8mm"], a.seed, stop,
        start_rate=rate, max_connecting=a.in_flight, summary_interval=5.0,
        telemetry_interval=a.telemetry_interval))


async def _fan_out(server: CorralServer, ids: list[str]) -> tuple[float, int, int]:
    """One ping to every device in one request (``POST /api/v1/commands`` with the device ids,
    as an operator fans a command out); returns (seconds until the server accepted it, devices
    it did not accept, retried requests)."""
    async with server.async_client(max_connections=1) as c:
        t0 = time.perf_counter()
        r = await c.post("/commands", json={"name": "ping", "device_ids": ids}, timeout=300)
        took = time.perf_counter() - t0
    if r.status_code != 201:
        print(f"connections: fan-out POST failed: {r.status_code} {r.text[:200]}", file=sys.stderr, flush=True)
        return took, len(ids), 0
    return took, len(ids) - int(r.json()["count"]), 0


def _cpu_fraction(pid: int, seconds: float) -> float:
    """The share of one core process ``pid`` uses over the next ``seconds``."""
    c0 = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / seconds


def _succeeded(db_path: Path, since: float) -> tuple[int, float | None]:
    """Commands created since ``since`` that succeeded, and the last one's ``updated_at``, read
    from the server's database (read-only; WAL readers do not block the server)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        n, last = con.execute("SELECT count(DISTINCT device_id), max(updated_at) FROM device_commands "
                              "WHERE status = 'succeeded' AND created_at >= ?", (since,)).fetchone()
        return int(n), last
    finally:
        con.close()


def run_corral(tmp: Path, n: int, clients: int, in_flight: int, open_loop_rate: float, telemetry_interval: float,
               sample_size: int,
               timeout: float, seed: int) -> dict[str, Any]:
    server = CorralServer(tmp / "corral")
    server.init()
    server.start()
    out: dict[str, Any] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with server.client() as c:
            r = c.post("/enrollment-tokens", json={"description": "bench"})
            r.raise_for_status()
            token = r.json()["token"]
            for _ in range(5):  # warm-up: import and cache what the REST paths need
                c.get("/devices", params={"limit": 10}).raise_for_status()
        settle(server.pid)
        rss0, cpu0 = rss(server.pid), cpu_seconds(server.pid)
        logs = [tmp / f"sim-client-{k}.log" for k in range(clients)]
        for k, share in enumerate(_spread(n, clients)):
            procs.append(_spawn(["--role", "sim-client", "--server", server.url, "--token", token, "--devices",
                                 str(share), "--state-dir", str(tmp / f"sim-{k}"), "--seed", str(k + 1),
                                 "--start-rate", str(open_loop_rate / clients),
                                 "--in-flight", str(0 if open_loop_rate else max(1, in_flight // clients)),
                                 "--telemetry-interval", str(telemetry_interval)],
                                logs[k]))
        t_start = _started_at(procs, logs)

        def alive() -> None:
            server.check_alive()
            for p, log in zip(procs, logs, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"sim client exited with {p.returncode}:\n{tail(log)}")

        took, timeline = _wait_connected(server.connected, n, t_start, timeout, alive)
        connected = server.connected()
        cpu1 = cpu_seconds(server.pid)
        settled = settle(server.pid)
        rss1 = rss(server.pid)
        idle = _cpu_fraction(server.pid, 5.0)
        out.update(connected=connected, connect_s=took, timeline=timeline[::max(1, len(timeline) // 50)],
                   connect_rate=(connected / took) if took else None, ramp_rate=_ramp_rate(timeline, n),
                   rss_before=rss0, rss_after=rss1, rss_per_conn=(rss1 - rss0) / max(connected, 1),
                   # net of the heartbeats of the devices already connected (on average half of them)
                   cpu_ms_per_connect=(cpu1 - cpu0 - idle * (took or 0) / 2) * 1000 / max(connected, 1),
                   settle_s=settled,
                   idle_cpu_fraction=idle)
        print(f"connections: corral: {connected:,}/{n:,} connected in {took or float('nan'):.1f} s; "
              f"RSS {rss0 / 2**20:.0f} → {rss1 / 2**20:.0f} MiB", flush=True)

        with server.client() as c:
            ids: list[str] = []
            cursor = None
            while True:
                q: dict[str, Any] = {"selector": "online", "limit": 1000, "status": "accepted"}
                if cursor:
                    q["cursor"] = cursor
                body = c.get("/devices", params=q).json()
                ids += [d["id"] for d in body["items"]]
                cursor = body.get("next_cursor")
                if not cursor:
                    break
            out["online_accepted"] = len(ids)
            rng = random.Random(seed)
            sample = rng.sample(ids, min(sample_size, len(ids)))
            # command round trip, one device at a time
            for dev in sample[:10]:  # warm-up
                c.post(f"/devices/{dev}/commands", json={"name": "ping", "wait": 5})
            rtts, at, failed = [], [], 0
            cpu0, w0 = cpu_seconds(server.pid), time.perf_counter()
            for dev in sample:
                t0 = time.perf_counter()
                r = c.post(f"/devices/{dev}/commands", json={"name": "ping", "wait": 5})
                rtts.append(time.perf_counter() - t0)
                at.append(t0 - w0)
                if r.status_code != 201 or r.json()["status"] != "succeeded":
                    failed += 1
            wall = time.perf_counter() - w0
            out["rtt_ms"] = summarize_ms(rtts)
            out["rtt_samples_ms"] = [round(x * 1000, 3) for x in rtts]
            out["rtt_sample_start_s"] = [round(x, 3) for x in at]
            out["rtt_failed"] = failed
            # server CPU per command, net of what the idle fleet costs (heartbeats, presence)
            out["cpu_ms_per_command_rtt"] = ((cpu_seconds(server.pid) - cpu0 - idle * wall) * 1000
                                             / max(len(sample), 1))
        settle(server.pid)

        # fan-out: one ping to every device
        since = time.time()
        cpu0, w0 = cpu_seconds(server.pid), time.perf_counter()
        enqueue_s, errors, retried = asyncio.run(_fan_out(server, ids))
        server.check_alive()
        done, last = _succeeded(server.db_path, since)
        deadline = time.time() + timeout
        while done < len(ids) - errors and time.time() < deadline:
            time.sleep(0.25)
            done, last = _succeeded(server.db_path, since)
        out.update(fanout_enqueue_s=enqueue_s, fanout_errors=errors, fanout_retried=retried, fanout_succeeded=done,
                   fanout_s=(last - since) if last else None,
                   cpu_ms_per_command_fanout=((cpu_seconds(server.pid) - cpu0 - idle * (time.perf_counter() - w0))
                                              * 1000 / max(len(ids), 1)))
        settle(server.pid)
        out["rss_after_fanout"] = rss(server.pid)
        server.check_alive()
    finally:
        for p in procs:
            stop_process(p)
        server.stop()
    return out


# --- the benchmark --------------------------------------------------------------------------------


def run(n: int, clients: int, in_flight: int, sample_size: int, quick: bool,
        skip_reference: bool = False, open_loop_rate: float = 0.0, keep: bool = False, seed: int = 7,
        telemetry_interval: float = 0.0) -> dict[str, Any]:
    nofile = raise_nofile()
    if nofile < n + 1024:
        raise SystemExit(f"the open-file limit is {nofile}; {n} connections need at least {n + 1024}")
    params: dict[str, Any] = {"devices": n, "client_processes": clients, "rtt_sample": sample_size,
                              "telemetry_interval_s": telemetry_interval}
    if open_loop_rate:
        params["open_loop_connect_rate"] = open_loop_rate
    else:
        params["handshakes_in_flight"] = in_flight
    result = new_result("connections", "Connections: N agents on one server process", params, quick)
    result["method"] = (
        f"{n:,} simulated devices (`corral.sim.runner.run_sim`: real agents, real Ed25519 handshakes, new "
        f"devices enrolling with a token) in {clients} client processes connect to one `corral server` "
        "process (SQLite), closed-loop: each client keeps at most "
        f"{max(1, in_flight // clients)} of its devices connecting at a time (`max_connecting`), so the "
        "rate is what the server can take. **Reference**: a bare `websockets` server "
        "(`websockets.asyncio.server`, uvloop, no compression) holding the same number of connections "
        "from the same number of processes using the same client library, measured in the same run. "
        "*RSS per connection* = (server RSS with all connected, once idle − RSS before) ÷ N. "
        "*Command round trip* = `POST /api/v1/devices/{id}/commands {\"name\":\"ping\",\"wait\":5}` "
        "timed at the HTTP client (REST → hub → device → result → REST), one device at a time over a "
        "random sample; the reference relays a frame control socket → server → device socket → echo "
        "→ server → control socket. *Fan-out* = one `ping` to every device (one `POST /api/v1/commands` "
        "with all the device ids) until the last one is `succeeded`; the reference sends one frame to "
        "every socket and waits for all echoes. "
        + ("The agents send no telemetry (`--telemetry-interval 0`, the default here): the figures are the "
           "cost of connections, as the reference's; what monitoring adds per device is measured by "
           "`bench/ingest` and with `--telemetry-interval 10`."
           if not telemetry_interval else
           f"The agents send telemetry every {telemetry_interval:g} s (the SimPlatform's metrics), so the "
           "server's figures include ingesting and storing it.")
    )
    timeout = max(120.0, n / 20)
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-conn-"))
    if keep:
        print(f"connections: keeping {tmp}", flush=True)
    t0 = time.perf_counter()
    for k, share in enumerate(_spread(n, clients)):
        prepare_identities(tmp / f"sim-{k}", share)
    result["details"]["identities_s"] = time.perf_counter() - t0
    print(f"connections: {n:,} device keys written in {result['details']['identities_s']:.1f} s", flush=True)

    ref: dict[str, Any] = {}
    if not skip_reference:
        sample = random.Random(seed).sample(range(n), min(sample_size, n))
        try:
            ref = run_reference(tmp, n, clients, in_flight, sample, timeout)
        except BaseException:
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        result["details"]["reference"] = ref
        print(f"connections: reference: {ref['connected']:,} connected, "
              f"{ref['rss_per_conn'] / 1024:.1f} KiB/conn, rtt p99 {ref['rtt_ms']['p99']:.2f} ms, "
              f"broadcast {ref['broadcast_s'] * 1000:.0f} ms", flush=True)
    try:
        cor = run_corral(tmp, n, clients, in_flight, open_loop_rate, telemetry_interval, sample_size, timeout, seed)
    except BaseException:
        print(f"connections: server log (tail):\n{tail(tmp / 'corral' / 'server.log')}", file=sys.stderr)
        raise
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result["details"]["corral"] = cor

    def g(d: dict[str, Any], *keys: str) -> Any:
        for k in keys:
            if not isinstance(d, dict) or k not in d or d[k] is None:
                return None
            d = d[k]
        return d

    kib = 1024.0
    mem, mem_ref = cor["rss_per_conn"] / kib, (ref["rss_per_conn"] / kib if ref else None)
    rtt99 = g(cor, "rtt_ms", "p99")
    all_connected = cor["connected"] >= n and cor["connect_s"] is not None
    add_figures(
        result,
        Figure("agents connected to one server process", cor["connected"], "", g(ref, "connected"),
               goal=f"≥ {DEVICES_GOAL:,}", met=all_connected if n >= DEVICES_GOAL else None, better="higher",
               note=f"of {n:,} started" + ("" if n >= DEVICES_GOAL else
                                           f"; the goal needs a run with --devices {DEVICES_GOAL}")),
        Figure("connect rate", cor["connect_rate"], "conn/s", g(ref, "connect_rate"), better="higher",
               note="all N, from the first client's start"),
        Figure("connect rate, 10 %→90 % of N", cor["ramp_rate"], "conn/s", g(ref, "ramp_rate"), better="higher"),
        Figure("server RSS per connection", mem, "KiB", mem_ref,
               goal=f"≤ {MEMORY_GOAL_RATIO:g}× reference",
               met=(mem / mem_ref <= MEMORY_GOAL_RATIO) if mem_ref else None),
        Figure("command round trip p50", g(cor, "rtt_ms", "p50"), "ms", g(ref, "rtt_ms", "p50"),
               note=f"{sample_size} devices, one at a time"),
        Figure("command round trip p99", rtt99, "ms", g(ref, "rtt_ms", "p99"),
               goal=f"< {RTT_GOAL_MS:.0f} ms", met=(rtt99 < RTT_GOAL_MS) if rtt99 is not None else None),
        Figure("fan-out: one command to all, until all results are in", cor.get("fanout_s"), "s",
               ref["broadcast_s"] if ref else None,
               note=f"{cor['fanout_succeeded']:,} succeeded"
               + (f", {cor['fanout_errors']} devices not accepted" if cor["fanout_errors"] else "")),
        Figure("fan-out: the one request accepted (all commands stored)", cor["fanout_enqueue_s"], "s"),
        Figure("fan-out throughput", cor["fanout_succeeded"] / cor["fanout_s"] if cor.get("fanout_s") else None,
               "commands/s", n / ref["broadcast_s"] if ref else None, better="higher"),
    )
    result["details"]["load_average_end"] = os.getloadavg()
    result["notes"] = [
        f"One machine with {os.cpu_count()} CPUs runs the server, the {clients} client processes and the "
        "benchmark driver: the clients (N agents signing handshakes, answering commands) compete with the "
        "server for the same cores, so rates and latencies are lower bounds for a server with its own "
        "machine. The reference is measured under the same constraint.",
        f"Corral's connect includes enrollment of new devices (Ed25519 verification, a write transaction "
        f"with an audit entry, the inventory write); server CPU per connect: "
        f"{cor['cpu_ms_per_connect']:.2f} ms. Server CPU per command: {cor['cpu_ms_per_command_rtt']:.2f} ms "
        f"(round trip), {cor['cpu_ms_per_command_fanout']:.2f} ms (fan-out). With all {cor['connected']:,} "
        f"connected and idle (a heartbeat per device every 15 s), the server uses "
        f"{cor['idle_cpu_fraction'] * 100:.0f} % of a core; these per-operation figures are net of that.",
        f"Server RSS {cor['rss_before'] / 2**20:.0f} MiB before, {cor['rss_after'] / 2**20:.0f} MiB with "
        f"{cor['connected']:,} connected, {cor['rss_after_fanout'] / 2**20:.0f} MiB after the fan-out"
        + (f"; reference {ref['rss_before'] / 2**20:.0f} → {ref['rss_after'] / 2**20:.0f} MiB." if ref else "."),
        "Corral's round trip includes an HTTP request with token authentication, the command row and its "
        "audit entry, and the hub's status writes (sent, acknowledged, succeeded); the reference is the floor "
        "a WebSocket relay on this machine can do, with no HTTP, authentication or storage.",
        "RSS per connection includes what the first connections load once (code paths, caches); at N in the "
        "thousands that is under 1 KiB per connection, at the --quick N of 200 it dominates.",
    ]
    return result


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=DEFAULT_DEVICES,
                    help=f"agents (default {DEFAULT_DEVICES:,}; the goal is {DEVICES_GOAL:,})")
    ap.add_argument("--clients", type=int, default=2, help="client processes (each runs N/clients agents)")
    ap.add_argument("--in-flight", type=int, default=64,
                    help="connections opening at a time, all clients together (closed loop)")
    ap.add_argument("--open-loop-rate", type=float, default=0.0,
                    help="instead: start agents with run_sim as a Poisson process at this rate (/s, all clients)")
    ap.add_argument("--sample", type=int, default=200, help="devices in the round-trip sample")
    ap.add_argument("--telemetry-interval", type=float, default=0.0,
                    help="seconds between the agents' telemetry batches (0, the default: none)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database, device keys)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 devices, 1 client, 30 samples")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    # internal: the subprocesses this benchmark starts
    ap.add_argument("--role", choices=["sim-client", "ref-server", "ref-client"], help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--state-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--start-rate", type=float, default=500.0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    return ap


def main_result(argv: list[str] | None = None) -> dict[str, Any]:
    """Run with command-line style arguments; returns the result (not saved)."""
    a = _parser().parse_args(argv)
    if a.quick:
        a.devices, a.clients, a.sample = min(a.devices, 200), 1, min(a.sample, 30)
    return run(a.devices, a.clients, a.in_flight, a.sample, a.quick, a.skip_reference,
               a.open_loop_rate, a.keep, telemetry_interval=a.telemetry_interval)


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    if a.role == "sim-client":
        sys.exit(_sim_client(a))
    if a.role in ("ref-server", "ref-client"):
        raise_nofile()
        with _loop_runner() as runner:
            if a.role == "ref-server":
                runner.run(_ref_server(a.port))
            else:
                runner.run(_ref_client(a.url, a.devices, a.offset, a.in_flight))
        return
    finish(main_result(argv), docs=not a.no_docs)


if __name__ == "__main__":
    main()
